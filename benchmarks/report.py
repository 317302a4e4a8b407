"""Run the trace benchmarks and print each variant as a multiple of ``x.clone()`` and of ``torch.cumsum``.

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
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench_trace.py"), "-q", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds",
           "--benchmark-sort=name", *extra]
    print("$", " ".join(f"{k}={env[k]}" for k in sorted(RAISED_MALLOC) if k in env), " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


def _group_key(group: str):
    m = re.match(r"T=(\d+) (\w+)", group or "")
    return (int(m.group(1)), m.group(2)) if m else (0, group or "")


def _variant_key(v: str):
    order = ["clone", "cumsum", "cpp:", "torch:", "dense", "torchrl-conv"]
    for i, p in enumerate(order):
        if v.startswith(p):
            return (i, v)
    return (len(order), v)


def table(data: dict) -> str:
    groups: dict = {}
    for b in data["benchmarks"]:
        variant = b.get("extra_info", {}).get("variant", b["name"])
        groups.setdefault(b["group"], {})[variant] = b["stats"]
    info = data.get("machine_info", {}).get("creditlib", {})
    lines = [f"threads={info.get('threads')} torch={info.get('torch')} quick={info.get('quick')} "
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
    """The issue's targets (B = 64, T = 16k, one thread) read off the largest T of this run."""
    med: dict = {}
    for b in data["benchmarks"]:
        T, direction = _group_key(b["group"])
        med[(T, direction, b.get("extra_info", {}).get("variant", b["name"]))] = b["stats"]["median"]
    if not med:
        return ""
    Tmax = max(k[0] for k in med)

    def ratio(a, b, T=Tmax, da="fwd", db=None):
        x, y = med.get((T, da, a)), med.get((T, db or da, b))
        return f"{x / y:.2f}x" if x and y else "n/a"

    lines = [f"targets at T={Tmax} (issue 2):"]
    for be in ("cpp", "torch"):
        lines.append(f"  {be}:recent  fwd {ratio(be + ':recent', 'clone')} of clone (target <= 3 for the fused kernel), "
                     f"fwd+bwd {ratio(be + ':recent', 'clone', da='fwdbwd')} of clone (<= 8)")
        for st in ("both", "recent+eps", "both+eps"):
            lines.append(f"  {be}:{st} / {be}:recent  fwd {ratio(f'{be}:{st}', f'{be}:recent')}, "
                         f"fwd+bwd {ratio(f'{be}:{st}', f'{be}:recent', da='fwdbwd')} (<= 2)")
    lines.append(f"  torch:recent / cumsum  fwd {ratio('torch:recent', 'cumsum')}, "
                 f"fwd+bwd {ratio('torch:recent', 'cumsum', da='fwdbwd')} (fallback target <= 1.5)")
    tr = sorted(k[0] for k in med if k[2] == "torchrl-conv" and k[1] == "fwd")
    if tr:
        t = tr[-1]
        lines.append(f"  torchrl-conv / cpp:recent at T={t}: fwd {ratio('torchrl-conv', 'cpp:recent', T=t)}, "
                     f"fwd+bwd {ratio('torchrl-conv', 'cpp:recent', T=t, da='fwdbwd')} "
                     f"(target >= 1000x at T=16384, where torchrl-conv is not run)")
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
