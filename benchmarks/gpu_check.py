#!/usr/bin/env python
"""One-shot GPU check of the trace kernels: correctness of every backend, speed against the copy
bandwidth, and one recipe step with a vLLM rollout. Run it once on a CUDA machine:

    python benchmarks/gpu_check.py                      # CUDA, full sizes (about 1-3 minutes)
    python benchmarks/gpu_check.py --device cpu --quick # the same logic on CPU at tiny sizes (CI)
    python benchmarks/gpu_check.py --out check.json     # where the JSON goes (default gpu_check.json)

1. **Validation.** Every backend for the device (CUDA: ``triton``, ``torch``; CPU: ``cpp`` when its
   build is cached, ``torch``, and ``triton`` only under ``TRITON_INTERPRET=1``) against the dense
   float64 reference, for every style (recent, both, eps floors, normalised, sequence), every mask
   kind (none, right / left padding, several runs, random, all-masked rows, varlen), forward and
   transpose, in float32 and bfloat16; autograd through the public API; and a long row
   (``T = 16k``, ``d = 0.999``) in float32 against the backend's own float64 result.
2. **Speed.** ``recent`` forward (and other styles, and forward + backward through the public API)
   against ``x.clone()`` at ``T = 16k`` and ``128k``, float32 and bfloat16, ``B`` chosen so that
   ``B * T`` is about ``--numel`` elements (2^27 by default: 512 MiB in float32). Reported as time
   multiples of the clone and as the trace's share of the copy bandwidth (bytes moved / time,
   the mask byte included); the target is >= 60% for ``recent`` forward.
3. **Recipe step.** When vLLM is importable: ``recipes/grpo_lambda.py --rollout vllm`` for one RL
   step on a tiny Qwen2 model saved to a temporary directory and a 16-problem local dataset
   (``--recipe-rollout hf`` runs the same command with the transformers rollout instead).

Prints a table and writes JSON. The exit status is 1 when a validation case fails (or the recipe
step fails), 0 otherwise; the bandwidth target is reported, not enforced (``--strict`` enforces it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from creditlib import functional as F  # noqa: E402
from creditlib.ops.trace import Schedule, reference_scan, trace_scan  # noqa: E402
from creditlib.style import DecayStyle  # noqa: E402

# (name, kind, d, eps, normalize): every style the kernels take
STYLES = [
    ("recent", "recent", 0.99, 0.0, False),
    ("recent-eps", "recent", 0.9, 0.05, False),
    ("both", "both", 0.99, 0.0, False),
    ("both-eps", "both", 0.95, 0.1, False),
    ("recent-norm", "recent", 0.99, 0.0, True),
    ("both-eps-norm", "both", 0.9, 0.05, True),
    ("sequence", "sequence", 1.0, 0.0, False),
]
MASKS = ("none", "right", "left", "runs", "random", "empty-rows")
TARGET_BW = 0.60


def backends_for(device: torch.device) -> list:
    """The backends to check on ``device``, with the reason for each one left out."""
    from creditlib.ops.trace import build, triton_kernel

    out, skipped = [], {}
    if triton_kernel.available() and (device.type == "cuda" or triton_kernel._INTERPRET):
        out.append("triton")
    else:
        skipped["triton"] = "needs CUDA (or TRITON_INTERPRET=1)"
    if device.type == "cpu":
        if build.ready():
            out.append("cpp")
        else:
            skipped["cpp"] = "no cached C++ build (python -m creditlib.build_kernels)"
    out.append("torch")
    return out, skipped


def make_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """bool ``[B, T]`` of one mask kind (rows vary in length where the kind allows it)."""
    lens = torch.randint(max(1, T // 4), T + 1, (B,), generator=gen)  # [B]
    ar = torch.arange(T)  # [T]
    if kind == "none":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        return ar[None, :] < lens[:, None]
    if kind == "left":
        return ar[None, :] >= (T - lens)[:, None]
    if kind == "runs":  # several runs per row: blocks of 7 valid, 3 masked, shifted per row
        return ((ar[None, :] + torch.arange(B)[:, None] * 3) % 10) < 7
    if kind == "random":
        return torch.rand(B, T, generator=gen) < 0.7
    if kind == "empty-rows":  # every other row all masked, the rest right padded
        m = ar[None, :] < lens[:, None]
        m[::2] = False
        return m
    raise ValueError(f"unknown mask kind {kind!r}")


def _rel_err(z: torch.Tensor, ref: torch.Tensor) -> float:
    z64, r64 = z.double().cpu(), ref.double().cpu()
    if r64.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(z64).all()):
        return float("inf")
    return float((z64 - r64).abs().max()) / max(1.0, float(r64.abs().max()))


def validate(device: torch.device, backends: list, B: int, T: int, seed: int = 0,
             dtypes=(torch.float32, torch.bfloat16)) -> list:
    """Every backend x style x mask x direction x dtype against the dense float64 reference."""
    rows = []
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}
    for name, kind, d, eps, norm in STYLES:
        style = DecayStyle(kind, gamma=1.0, lam=d, eps=eps, normalize=norm)
        sched = Schedule.of(style)
        gen = torch.Generator().manual_seed(seed)
        for mk in MASKS + ("varlen",):
            if mk == "varlen":
                lens = torch.randint(0, T + 1, (B,), generator=gen)  # [B], some may be 0
                cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])  # [B+1]
                x64 = torch.randn(int(cu[-1]), generator=gen, dtype=torch.float64)  # [N]
                mu = None
            else:
                mask = make_mask(mk, B, T, gen)  # [B, T]
                x64 = torch.randn(B, T, generator=gen, dtype=torch.float64)  # [B, T]
                x64 = torch.where(mask, x64, torch.full_like(x64, float("nan")))  # masked: never read
                mu = None if mk == "none" else mask.view(torch.uint8)
                cu = None
            for tr in (False, True):
                # the reference of the rounded input, float64, on CPU
                refs = {dt: reference_scan(x64.to(dt).double(), mu, cu, sched, tr) for dt in dtypes}
                for be in backends:
                    for dt in dtypes:
                        ref = refs[dt]
                        xd = x64.to(device=device, dtype=dt)
                        mud = None if mu is None else mu.to(device)
                        cud = None if cu is None else cu.to(device)
                        t0 = time.perf_counter()
                        try:
                            z = trace_scan(xd, mud, cud, sched, tr, backend=be)
                            err = _rel_err(z, ref)
                            ok = err <= tol[dt] and z.dtype == dt
                            msg = ""
                        except Exception as e:  # noqa: BLE001 - reported as a failed case
                            err, ok, msg = float("nan"), False, f"{type(e).__name__}: {e}"
                        rows.append(dict(check="value", backend=be, style=name, mask=mk, transpose=tr,
                                         dtype=str(dt).replace("torch.", ""), err=err, tol=tol[dt], ok=bool(ok),
                                         ms=1e3 * (time.perf_counter() - t0), error=msg))
        # autograd through the public API (float64: gradient = the transpose)
        mask = make_mask("runs", B, T, gen)  # [B, T]
        g = torch.randn(B, T, generator=gen, dtype=torch.float64)  # [B, T]
        x = torch.randn(B, T, generator=gen, dtype=torch.float64)  # [B, T]
        gref = reference_scan(g, mask.view(torch.uint8), None, sched, True)
        for be in backends:
            try:
                xd = x.to(device).requires_grad_(True)
                z = F.eligibility_trace(xd, mask.to(device), style, backend=be)
                (gx,) = torch.autograd.grad(z, xd, g.to(device))
                err = _rel_err(gx, gref)
                ok, msg = err <= 1e-10, ""
            except Exception as e:  # noqa: BLE001
                err, ok, msg = float("nan"), False, f"{type(e).__name__}: {e}"
            rows.append(dict(check="grad", backend=be, style=name, mask="runs", transpose=False, dtype="float64",
                             err=err, tol=1e-10, ok=bool(ok), error=msg))
    return rows


def validate_long(device: torch.device, backends: list, T: int, seed: int = 0) -> list:
    """A long row in float32 against the same backend in float64 (``d = 0.999``)."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, T, generator=gen) < 0.9  # [2, T]
    mask[0] = True
    x = torch.randn(2, T, generator=gen, dtype=torch.float64)  # [2, T]
    for name, kind, d, eps, norm in (("recent", "recent", 0.999, 0.0, False), ("both-eps", "both", 0.999, 0.01, False),
                                     ("recent-norm", "recent", 0.9999, 0.0, True)):
        sched = Schedule.make(kind, d, eps, norm)
        for be in backends:
            for tr in (False, True):
                try:
                    mu = mask.view(torch.uint8).to(device)
                    ref = trace_scan(x.to(device), mu, None, sched, tr, backend=be).cpu()  # [2, T] float64
                    z = trace_scan(x.to(device=device, dtype=torch.float32), mu, None, sched, tr, backend=be)
                    err = float((z.double().cpu() - ref).abs().max() / ref.abs().max())
                    ok, msg = err <= 5e-6 and bool(torch.isfinite(z).all()), ""
                except Exception as e:  # noqa: BLE001
                    err, ok, msg = float("nan"), False, f"{type(e).__name__}: {e}"
                rows.append(dict(check=f"long T={T}", backend=be, style=name, mask="random", transpose=tr,
                                 dtype="float32", err=err, tol=5e-6, ok=bool(ok), error=msg))
    return rows


def validate_split(device: torch.device, B: int = 3, T: int = 600, seed: int = 0,
                   dtypes=(torch.float32, torch.float64)) -> list:
    """The Triton kernel's chunk-parallel path (``recent``, few rows; chosen by default on CUDA for
    fewer than ``SPLIT_MAX_ROWS`` rows of at least 4 chunks), forced at a small chunk, against the
    dense reference."""
    from creditlib.ops.trace import triton_kernel

    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, kind, d, eps, norm in STYLES:
        if kind != "recent" or eps:
            continue
        sched = Schedule.make(kind, d, eps, norm)
        for mk in MASKS:
            mask = make_mask(mk, B, T, gen)  # [B, T]
            x64 = torch.randn(B, T, generator=gen, dtype=torch.float64)  # [B, T]
            mu = None if mk == "none" else mask.view(torch.uint8)
            for tr in (False, True):
                for dt in dtypes:
                    ref = reference_scan(x64.to(dt).double(), mu, None, sched, tr)
                    try:
                        z = triton_kernel.trace_scan(x64.to(device=device, dtype=dt), None if mu is None else mu.to(device),
                                                    None, sched, tr, block=64, split=True)
                        err = _rel_err(z, ref)
                        tol = 2e-5 if dt == torch.float32 else 1e-10
                        ok, msg = err <= tol, ""
                    except Exception as e:  # noqa: BLE001
                        err, tol, ok, msg = float("nan"), 0.0, False, f"{type(e).__name__}: {e}"
                    rows.append(dict(check="split", backend="triton", style=name, mask=mk, transpose=tr,
                                     dtype=str(dt).replace("torch.", ""), err=err, tol=tol, ok=bool(ok), error=msg))
    return rows


def _timer(device: torch.device):
    """``time(fn, reps) -> median seconds`` (CUDA events on GPU, perf_counter on CPU)."""
    def run(fn, reps: int) -> float:
        fn()  # warm-up (compiles, allocator)
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]
    return run


def bench(device: torch.device, backend: str, lengths: list, numel: int, reps: int) -> list:
    """Trace timings as multiples of ``x.clone()`` and shares of its bandwidth."""
    timeit = _timer(device)
    rows = []
    for T in lengths:
        B = max(1, numel // T)
        for dt in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(B, T, device=device, dtype=dt, generator=gen)  # [B, T]
            lens = torch.randint(T // 2, T + 1, (B,), device=device, generator=gen)  # [B]
            mask = torch.arange(T, device=device)[None, :] < lens[:, None]  # [B, T] right padded
            mu = mask.view(torch.uint8)
            es = x.element_size()
            t_clone = timeit(lambda: x.clone(), reps)
            bw_clone = 2 * x.numel() * es / t_clone  # bytes / s
            cases = [("recent", "fwd", None), ("recent", "fwd", "right"), ("both-eps", "fwd", "right"),
                     ("recent-norm", "fwd", "right"), ("sequence", "fwd", "right"), ("recent", "fwd+bwd", "right")]
            for sname, what, mk in cases:
                _, kind, d, eps, norm = next(s for s in STYLES if s[0] == sname)
                sched = Schedule.make(kind, d, eps, norm)
                m = None if mk is None else mu
                if what == "fwd":
                    fn = lambda: trace_scan(x, m, None, sched, False, backend=backend)  # noqa: E731
                    moved = 2 * x.numel() * es + (0 if m is None else x.numel())
                else:
                    style = DecayStyle(kind, gamma=1.0, lam=d, eps=eps, normalize=norm)
                    xg = x.detach().requires_grad_(True)
                    gy = torch.ones_like(x)

                    def fn(xg=xg, gy=gy, style=style):
                        z = F.eligibility_trace(xg, mask, style, backend=backend)
                        torch.autograd.grad(z, xg, gy)
                    moved = 5 * x.numel() * es + 2 * x.numel()  # x, z, g in; gx out; mask twice
                try:
                    t = timeit(fn, reps)
                    rows.append(dict(backend=backend, T=T, B=B, dtype=str(dt).replace("torch.", ""), style=sname,
                                     what=what, mask=mk or "none", ms=1e3 * t, clone_ms=1e3 * t_clone,
                                     x_clone=t / t_clone, bw_share=(moved / t) / bw_clone,
                                     clone_GBps=bw_clone / 1e9))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(backend=backend, T=T, B=B, dtype=str(dt).replace("torch.", ""), style=sname,
                                     what=what, mask=mk or "none", error=f"{type(e).__name__}: {e}"))
            # few rows (B = 64, the losses' usual batch): on CUDA the Triton kernel's chunk-parallel path
            Bs = min(64, B)
            xs, ms = x[:Bs].clone(), mu[:Bs].clone()  # [Bs, T]
            t_cs = timeit(lambda: xs.clone(), reps)
            sched = Schedule.make("recent", 0.99, 0.0, False)
            for mk, mm in (("none", None), ("right", ms)):
                try:
                    t = timeit(lambda: trace_scan(xs, mm, None, sched, False, backend=backend), reps)  # noqa: B023
                    moved = 2 * xs.numel() * es + (0 if mm is None else xs.numel())
                    rows.append(dict(backend=backend, T=T, B=Bs, dtype=str(dt).replace("torch.", ""), style="recent",
                                     what="fwd", mask=mk, ms=1e3 * t, clone_ms=1e3 * t_cs, x_clone=t / t_cs,
                                     bw_share=(moved / t) / (2 * xs.numel() * es / t_cs), clone_GBps=2 * xs.numel() * es / t_cs / 1e9,
                                     few_rows=True))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(backend=backend, T=T, B=Bs, dtype=str(dt).replace("torch.", ""), style="recent",
                                     what="fwd", mask=mk, error=f"{type(e).__name__}: {e}", few_rows=True))
            del x, mask, mu, xs, ms
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def recipe_step(rollout: str, device: torch.device, timeout: float) -> dict:
    """One RL step of ``recipes/grpo_lambda.py`` with ``--rollout {rollout}`` on a tiny saved model."""
    if rollout == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return dict(rollout=rollout, status="skipped", why=f"vLLM not importable ({type(e).__name__}: {e})")
    from creditlib.rl.model import tiny_qwen2
    from creditlib.rl.task import build_char_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="creditlib_gpu_check_"))
    try:
        tok = build_char_tokenizer()
        torch.manual_seed(0)
        # head_dim 32 (vLLM's kernels want >= 32), 2 layers: a few hundred thousand parameters
        model = tiny_qwen2(len(tok), 128, 2, 4, 256, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        data = tmp / "problems.jsonl"
        with open(data, "w") as f:
            for i in range(16):  # the dial walk's alphabet, so the char tokenizer knows every symbol
                f.write(json.dumps({"problem": f"{i % 10}++-?", "answer": str((i + 1) % 10)}) + "\n")
        cmd = [sys.executable, str(ROOT / "recipes" / "grpo_lambda.py"), "--model", str(tmp / "model"),
               "--dataset", str(data), "--eval-dataset", str(data), "--rollout", rollout,
               "--device", device.type, "--dtype", "float32", "--max-steps", "1", "--sft-steps", "0",
               "--eval-size", "4", "--eval-every", "1", "--prompts-per-step", "2", "--group-size", "4",
               "--max-new-tokens", "8", "--chat-template", "off", "--instruction", "", "--no-progress",
               "--no-plot", "--save-every", "1000", "--output-dir", str(tmp / "run")]
        if rollout == "vllm":
            cmd += ["--vllm-gpu-memory-utilization", "0.3"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("TRITON_INTERPRET", None)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rc, tail = p.returncode, (p.stdout + p.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            rc, tail = 124, f"timed out after {timeout:.0f} s: {(e.stderr or b'')[-1500:]!r}"
        metrics = tmp / "run" / "metrics.jsonl"
        steps = 0
        if metrics.exists():
            steps = sum(1 for line in metrics.read_text().splitlines() if '"phase": "rl"' in line)
        ok = rc == 0 and steps >= 1
        return dict(rollout=rollout, status="ok" if ok else "failed", rc=rc, rl_rows=steps,
                    seconds=time.perf_counter() - t0, tail="" if ok else tail, command=" ".join(cmd))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(rows, cols) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(cols)), "-+-".join("-" * x for x in w)]
    lines += [" | ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="'cuda' (default), 'cuda:N' or 'cpu'")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds; the CPU smoke test)")
    ap.add_argument("--lengths", default=None, help="comma-separated T for the timings (default 16384,131072; "
                                                     "--quick: 1024,4096)")
    ap.add_argument("--numel", type=int, default=None, help="B * T per timing (default 2^27; --quick: 2^14)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median; default 20, --quick 3)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="input dtypes of the validation (comma-separated)")
    ap.add_argument("--recipe-rollout", default="vllm", choices=("vllm", "hf", "none"),
                    help="the recipe step's rollout engine (vllm: skipped when vLLM is not installed)")
    ap.add_argument("--recipe-timeout", type=float, default=150.0, help="seconds for the recipe step")
    ap.add_argument("--strict", action="store_true", help="also fail when recent forward misses the bandwidth target")
    ap.add_argument("--out", default="gpu_check.json", help="JSON output path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu for the CPU smoke run)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda[:N] or cpu, got {args.device!r}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lengths = [int(v) for v in (args.lengths or ("1024,4096" if args.quick else "16384,131072")).split(",")]
    numel = args.numel or ((1 << 14) if args.quick else (1 << 27))
    reps = args.reps or (3 if args.quick else 20)
    t_start = time.perf_counter()

    backends, skipped = backends_for(device)
    vB, vT = (3, 40) if args.quick else (6, 300)
    dtypes = tuple(getattr(torch, n) for n in args.dtypes.split(","))
    val = validate(device, backends, vB, vT, dtypes=dtypes)
    val += validate_long(device, backends, 2048 if args.quick else 16384)
    if "triton" in backends:
        val += validate_split(device, *((2, 200) if args.quick else (3, 600)),
                              dtypes=(torch.float32,) if args.quick else (torch.float32, torch.float64))
    fails = [r for r in val if not r["ok"]]
    phases = {"validation": time.perf_counter() - t_start}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f"; torch {torch.__version__}; backends {backends}" + (f"; skipped {skipped}" if skipped else ""))
    print(f"\nvalidation: {len(val) - len(fails)}/{len(val)} cases within tolerance")
    worst = {}
    for r in val:
        k = (r["check"], r["backend"], r["dtype"])
        if k not in worst or not (r["err"] <= worst[k]["err"]):
            worst[k] = r
    print(_table(list(worst.values()), ["check", "backend", "dtype", "style", "mask", "transpose", "err", "tol", "ok"]))
    for r in fails[:20]:
        print("FAIL", {k: r[k] for k in ("check", "backend", "style", "mask", "transpose", "dtype", "err", "error")})

    perf = []
    for be in backends:
        if device.type == "cuda" or be != "triton":  # the interpreter is not worth timing
            perf += bench(device, be, lengths, numel, reps)
    phases["timings"] = time.perf_counter() - t_start - phases["validation"]
    print("\ntimings (median of %d; x_clone = time / x.clone(); bw = share of the clone's bandwidth):" % reps)
    print(_table(perf, ["backend", "T", "B", "dtype", "style", "what", "mask", "ms", "x_clone", "bw_share", "error"]))
    target = [r for r in perf if r.get("style") == "recent" and r.get("what") == "fwd" and "bw_share" in r
              and r["backend"] == backends[0] and not r.get("few_rows")]
    few = [r for r in perf if r.get("few_rows") and "bw_share" in r and r["backend"] == backends[0]]
    met = bool(target) and all(r["bw_share"] >= TARGET_BW for r in target)
    if target:
        print(f"\n'recent' forward ({backends[0]}): {min(r['bw_share'] for r in target):.0%} - "
              f"{max(r['bw_share'] for r in target):.0%} of copy bandwidth (target >= {TARGET_BW:.0%}): "
              f"{'met' if met else 'missed'}")
    if few:
        print(f"'recent' forward, B = {few[0]['B']} rows ({backends[0]}): {min(r['bw_share'] for r in few):.0%} - "
              f"{max(r['bw_share'] for r in few):.0%} of copy bandwidth")

    recipe = dict(rollout="none", status="skipped", why="--recipe-rollout none")
    if args.recipe_rollout != "none":
        recipe = recipe_step(args.recipe_rollout, device, args.recipe_timeout)
    print(f"\nrecipe step (--rollout {recipe['rollout']}): {recipe['status']}"
          + (f" ({recipe.get('why')})" if recipe.get("why") else "")
          + (f", {recipe['seconds']:.1f} s" if "seconds" in recipe else ""))
    if recipe["status"] == "failed":
        print(recipe.get("tail", ""))

    total = time.perf_counter() - t_start
    phases["recipe"] = total - phases["validation"] - phases["timings"]
    print(f"\ntotal {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")")
    report = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, backends=backends, skipped=skipped, validation=val,
                  validation_failures=len(fails), timings=perf, target_bw_share=TARGET_BW, target_met=met,
                  recipe=recipe, seconds=total, phase_seconds=phases)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}")
    bad = bool(fails) or recipe["status"] == "failed" or (args.strict and not met)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
