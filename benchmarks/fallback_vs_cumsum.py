"""The issue-18 speed check of the pure-PyTorch fallback: the `recent` trace through the public API
(`backend="torch"`) against `torch.cumsum`.

    .venv/bin/python benchmarks/fallback_vs_cumsum.py [--rounds 200] [--style recent] [--processes 5]

B = 64, T = 16384, float32, right-padded mask (row lengths uniform in [T/2, T]), one thread,
gamma*lambda = 0.999. Forward: `torch.cumsum(x, -1)` vs `F.eligibility_trace(x, mask, style,
backend="torch")`; forward+backward: both followed by `torch.autograd.grad` with the same upstream
gradient. The four are timed in interleaved rounds (one call of each per round), and the medians and
minima of the rounds are printed as ratios (target: <= 1.5x for both), once for wall-clock time
(`perf_counter`) and once for this process's CPU time (`process_time`, which leaves out the time
other processes took the core on a shared machine). Run it on a quiet machine and name the CPU
(`lscpu | grep 'Model name'`) and the malloc settings (printed) beside the figures.

`--processes K` repeats the whole measurement in K fresh Python processes, one after another, and
prints each one's ratios and then their median and range. On the VMs of this project a process
lands in a fast or a slow memory regime (how its freed buffers get reused or returned to the OS;
a page first touched again cost ~1.5 us per 4 KiB there) and keeps it, so one process says little.
"""
import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from creditlib import DecayStyle, functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200, help="interleaved rounds (default 200)")
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--style", default="recent", choices=("recent", "recent-norm", "both"),
                   help="trace style (default recent, gamma*lambda = 0.999)")
    p.add_argument("--forward-only", action="store_true",
                   help="time only cumsum and the trace forward, interleaved (no backward calls between them: "
                        "how traced_credit runs under no_grad in a trainer)")
    p.add_argument("--processes", type=int, default=1,
                   help="repeat in this many fresh processes and summarise them (default 1: this process)")
    a = p.parse_args()
    if a.rounds < 1 or a.B < 1 or a.T < 2 or a.processes < 1:
        raise ValueError(f"--rounds, --B and --processes must be >= 1 and --T >= 2, got {a.rounds}, {a.B}, "
                         f"{a.processes}, {a.T}")
    if a.processes > 1:
        return repeat(a)
    torch.set_num_threads(1)
    B, T = a.B, a.T
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(B, T, generator=g)  # [B, T]
    lens = torch.randint(T // 2, T + 1, (B, 1), generator=g)  # [B, 1]
    mask = torch.arange(T) < lens  # [B, T] right-padded
    kind = "both" if a.style == "both" else "recent"
    st = DecayStyle(kind, gamma=1.0, lam=0.999, normalize=a.style == "recent-norm")
    xg = x.clone().requires_grad_(True)  # [B, T]
    up = torch.randn(B, T, generator=g)  # [B, T] upstream gradient

    def cumsum():
        torch.cumsum(x, -1)

    def fwd():
        F.eligibility_trace(x, mask, st, backend="torch")

    def cumsum_fb():
        torch.autograd.grad(torch.cumsum(xg, -1), xg, up)

    def fwdbwd():
        torch.autograd.grad(F.eligibility_trace(xg, mask, st, backend="torch"), xg, up)

    fns = {"cumsum": cumsum, "fwd": fwd, "cumsum_fb": cumsum_fb, "fwdbwd": fwdbwd}
    if a.forward_only:
        fns = {"cumsum": cumsum, "fwd": fwd}
    for f in fns.values():
        for _ in range(5):
            f()
    wall = {k: [] for k in fns}  # perf_counter: what a user waits
    cpu = {k: [] for k in fns}  # process_time: leaves out the time other processes took this core
    for _ in range(a.rounds):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, one thread, "
          f"B={B} T={T} float32, style {a.style}, malloc {malloc or 'glibc defaults'}, "
          f"load {tuple(round(v, 2) for v in os.getloadavg())}" + (", forward only" if a.forward_only else ""))
    for name, ts in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        mn = {k: min(v) * 1e3 for k, v in ts.items()}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f" ms (medians of {a.rounds} interleaved rounds)")
        line = f"{name}: fwd/cumsum {med['fwd'] / med['cumsum']:.2f}x (min-to-min {mn['fwd'] / mn['cumsum']:.2f}x)"
        if "fwdbwd" in med:
            line += (f"; fwd+bwd/cumsum fwd+bwd {med['fwdbwd'] / med['cumsum_fb']:.2f}x "
                     f"(min-to-min {mn['fwdbwd'] / mn['cumsum_fb']:.2f}x)")
        print(line)


def repeat(a) -> None:
    """Run the measurement in ``a.processes`` fresh processes; print each and the median and range
    of their wall-clock median ratios."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rounds", str(a.rounds), "--B", str(a.B),
           "--T", str(a.T), "--style", a.style] + (["--forward-only"] if a.forward_only else [])
    ratios = []  # per process: fwd (and fwd+bwd) wall-clock median ratios
    for k in range(a.processes):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("wall: fwd/cumsum"))
        ratios.append([float(v) for v in re.findall(r"([0-9.]+)x \(min", line)])
        print(f"process {k + 1}/{a.processes}: {line[len('wall: '):]}", flush=True)
    print(out.splitlines()[0])
    parts = []
    for i, name in enumerate(("fwd/cumsum", "fwd+bwd/cumsum fwd+bwd")[: len(ratios[0])]):
        v = [r[i] for r in ratios]
        parts.append(f"{name} median {statistics.median(v):.2f}x (range {min(v):.2f}-{max(v):.2f}x)")
    print(f"over {a.processes} processes (wall-clock medians): " + "; ".join(parts))


if __name__ == "__main__":
    main()
