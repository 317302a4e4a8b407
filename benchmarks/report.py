"""Run the trace, prefix and loss benchmarks; print each variant as a multiple of ``x.clone()`` and of
``torch.cumsum``, then issue 13's targets as measured ratios, met or missed.

    python benchmarks/report.py                      # full sizes (a few minutes), raised malloc thresholds
    python benchmarks/report.py --quick              # small sizes, seconds
    python benchmarks/report.py --default-malloc     # glibc's default allocator thresholds
    python benchmarks/report.py --json out.json      # keep pytest-benchmark's JSON
    python benchmarks/report.py --from-json out.json # only print the table of an earlier run
    python benchmarks/report.py -- -k "cpp or clone" # extra pytest arguments after --

The suite runs in a child process so that the allocator variables (read by glibc at start-up) and
``OMP_NUM_THREADS=1`` apply to it; the table says which were used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# glibc: a fixed mmap threshold (32 MiB, glibc's maximum) and a high trim threshold keep large
# tensors' pages in the heap between calls instead of mmap/munmap (and page faults) every call.
RAISED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run_suite(json_path: str, quick: bool, default_malloc: bool, extra: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CREDITLIB_BENCH_QUICK="1" if quick else "0")
    for k in RAISED_MALLOC:
        env.pop(k, None)
    if not default_malloc:
        env.update(RAISED_MALLOC)
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench_trace.py"),
           os.path.join(HERE, "test_bench_prefix.py"), os.path.join(HERE, "test_bench_loss.py"),
           "-q", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds",
           "--benchmark-sort=name", *extra]
    print(f"CPU: {cpu_model()}", flush=True)
    print("$", " ".join(f"{k}={env[k]}" for k in sorted(RAISED_MALLOC) if k in env), " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


def _group_key(group: str):
    m = re.match(r"T=(\d+) (\w+)", group or "")
    return (int(m.group(1)), m.group(2)) if m else (0, group or "")


def _variant_key(v: str):
    order = ["clone", "cumsum", "cpp:", "torch:", "dense", "torchrl-conv", "ratio:"]
    for i, p in enumerate(order):
        if v.startswith(p):
            return (i, v)
    return (len(order), v)


def cpu_model() -> str:
    """This machine's CPU model name (``lscpu``'s "Model name"; the vendor changes between sessions
    of this project, and the ratios with it: every figure should name it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def run_cpu(data: dict) -> str:
    """The CPU of a benchmark run: pytest-benchmark's record (py-cpuinfo) when it has one, else this
    machine's, said so (a JSON read back elsewhere may come from another CPU)."""
    brand = (data.get("machine_info", {}).get("cpu") or {}).get("brand_raw")
    return brand if brand else f"{cpu_model()} (this machine; the JSON does not name its CPU)"


def table(data: dict) -> str:
    groups: dict = {}
    for b in data["benchmarks"]:
        variant = b.get("extra_info", {}).get("variant", b["name"])
        groups.setdefault(b["group"], {})[variant] = b["stats"]
    info = data.get("machine_info", {}).get("creditlib", {})
    lines = [f"CPU: {run_cpu(data)}",
             f"threads={info.get('threads')} torch={info.get('torch')} quick={info.get('quick')} "
             f"malloc: " + ", ".join(f"{k}={v}" for k, v in info.get("malloc", {}).items()), ""]
    lines.append("| group | variant | median ms | x clone | x cumsum | rounds |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for g in sorted(groups, key=_group_key):
        rows = groups[g]
        clone = rows.get("clone", {}).get("median")
        csum = rows.get("cumsum", {}).get("median")
        for v in sorted(rows, key=_variant_key):
            s = rows[v]
            med = s["median"]
            xc = f"{med / clone:.1f}" if clone else "-"
            xs = f"{med / csum:.2f}" if csum else "-"
            lines.append(f"| {g} | {v} | {med * 1e3:.3f} | {xc} | {xs} | {s['rounds']} |")
    return "\n".join(lines)


def targets(data: dict) -> str:
    """Issue 13's targets (B = 64, one thread), each as measured ratio / target / met, read off the
    largest T of this run (issue: T = 16k) and the loss and prefix groups."""
    med: dict = {}
    inter: dict = {}  # (T, direction) -> the interleaved ratios in extra_info
    for b in data["benchmarks"]:
        T, direction = _group_key(b["group"])
        variant = b.get("extra_info", {}).get("variant", b["name"])
        med[(T, direction, variant)] = b["stats"]["median"]
        if variant.startswith("ratio:"):
            inter[(T, direction)] = {k: v for k, v in b["extra_info"].items() if "/" in k}
    if not med:
        return ""
    trace_ts = [k[0] for k in med if k[1] in ("fwd", "fwdbwd")]
    Tmax = max(trace_ts) if trace_ts else 0
    lines = [f"issue 13 targets (trace at T={Tmax}; ratios of medians within this run; CPU: {run_cpu(data)}):"]

    def line(name, a, b, limit, T=Tmax, dirs=("fwd", "fwdbwd")):
        parts = []
        for d in dirs:
            x, y = med.get((T, d, a)), med.get((T, d if b != "clone" else "fwd", b))
            if x and y:
                r = x / y
                parts.append(f"{d} {r:.2f}x {'met' if r <= limit else 'MISSED'}")
            else:
                parts.append(f"{d} n/a")
        lines.append(f"  {name}: " + ", ".join(parts) + f" (target <= {limit})")

    # 1. the pure-PyTorch fallback against torch.cumsum (fwd+bwd: against cumsum's fwd+bwd)
    line("1 torch:recent / cumsum, right-padded", "torch:recent", "cumsum", 1.5)
    line("1 torch:recent@scattered / cumsum", "torch:recent@scattered", "cumsum", 2.5)
    # 2. the loss (test_bench_loss.py's group)
    loss = {k[2]: m for k, m in med.items() if str(k[1]).startswith("loss fwd+bwd")}
    if loss.get("grpo"):
        for v in ("grpo-lambda:recent", "plain:recent"):
            if loss.get(v):
                r = loss[v] / loss["grpo"]
                lines.append(f"  2 {v} / GRPOLoss fwd+bwd (B=64, T=4096): {r:.2f}x "
                             f"{'met' if r <= 1.05 else 'MISSED'} (target <= 1.05)")
    # 3. the C++ kernel through the public API (issue 18: fwd <= 2x, fwd+bwd <= 5x clone on either vendor)
    line("3 cpp:recent / clone", "cpp:recent", "clone", 4.0, dirs=("fwdbwd",))
    line("issue 18 cpp:recent fwd / clone", "cpp:recent", "clone", 2.0, dirs=("fwd",))
    line("issue 18 cpp:recent fwd+bwd / clone", "cpp:recent", "clone", 5.0, dirs=("fwdbwd",))
    for st in ("both", "recent+eps", "both+eps", "recent-norm", "both+eps-norm"):
        line(f"3 cpp:{st} / cpp:recent", f"cpp:{st}", "cpp:recent", 1.5)
    for st in ("recent", "both+eps", "recent-norm"):
        line(f"3 cpp:{st}@scattered / cpp:{st}", f"cpp:{st}@scattered", f"cpp:{st}", 2.0)
    # 4. the new primitives: normalised / plain (also interleaved), prefix_td + GAE / trace fwd+bwd
    for be in ("cpp", "torch"):
        line(f"4 {be}:recent-norm / {be}:recent", f"{be}:recent-norm", f"{be}:recent", 1.1)
    for direction in ("fwd", "fwdbwd"):
        info = inter.get((Tmax, direction), {})
        if info:
            lines.append(f"  4 interleaved cpp {direction}: " + ", ".join(
                f"{k} {v:.2f}x" for k, v in sorted(info.items()) if isinstance(v, float)) + " (target <= 1.1)")
    for (T, direction, v), m in sorted(med.items()):  # B = 64, G = 8, T = 4096
        if direction == "prefix" and v.startswith("prefix_td") and med.get((T, "prefix", "trace-fwdbwd")):
            r = m / med[(T, "prefix", "trace-fwdbwd")]
            lines.append(f"  4 T={T} {v} / trace fwd+bwd {r:.1f}x"
                         + (f" {'met' if r <= 10 else 'MISSED'} (target <= 10)" if v == "prefix_td+gae" else ""))
    for (T, direction), info in sorted(inter.items()):
        if direction == "prefix":
            lines.append(f"  4 T={T} interleaved: " + ", ".join(f"{k} {v:.1f}x" for k, v in info.items()))
    tr = sorted(k[0] for k in med if k[2] == "torchrl-conv" and k[1] == "fwd")
    if tr:
        t = tr[-1]
        x, y = med.get((t, "fwd", "torchrl-conv")), med.get((t, "fwd", "cpp:recent"))
        x2, y2 = med.get((t, "fwdbwd", "torchrl-conv")), med.get((t, "fwdbwd", "cpp:recent"))
        if x and y and x2 and y2:
            lines.append(f"  (issue 2) torchrl-conv / cpp:recent at T={t}: fwd {x / y:.0f}x, fwd+bwd {x2 / y2:.0f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (B = 8, T in {256, 1024})")
    p.add_argument("--default-malloc", action="store_true", help="do not raise glibc's malloc thresholds")
    p.add_argument("--json", help="where to keep pytest-benchmark's JSON")
    p.add_argument("--from-json", help="print the table of an existing JSON and exit")
    p.add_argument("extra", nargs="*", help="extra pytest arguments (after --)")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            data = json.load(f)
        print(table(data) + "\n\n" + targets(data))
        return 0
    path = a.json or os.path.join(tempfile.mkdtemp(prefix="creditlib-bench-"), "bench.json")
    rc = run_suite(path, a.quick, a.default_malloc, a.extra)
    if not os.path.exists(path):
        print(f"no benchmark JSON was written (pytest exit code {rc})", file=sys.stderr)
        return rc or 1
    with open(path) as f:
        data = json.load(f)
    print(table(data) + "\n\n" + targets(data))
    print(f"\n(JSON: {path})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
