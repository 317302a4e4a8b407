"""The issue-18 speed check: the C++ `recent` trace through the public API against `x.clone()`.

    .venv/bin/python benchmarks/trace_vs_clone.py

B = 64, T = 16384, float32, right-padded mask, one thread, gamma*lambda = 0.999; forward and
forward+backward (`torch.autograd.grad`) timed in interleaved rounds with the clone, medians and
minima of 200 rounds, printed as ratios (targets: forward <= 2x, forward+backward <= 5x). Run it on
a quiet machine and name the CPU (`lscpu | grep 'Model name'`) beside the figures.
"""
import statistics
import time

import torch

from creditlib import DecayStyle, functional as F
torch.set_num_threads(1)
B, T = 64, 16384
g = torch.Generator().manual_seed(0)
x = 0.01 * torch.randn(B, T, generator=g)                       # [B, T]
lens = torch.randint(T // 2, T + 1, (B, 1), generator=g)
mask = torch.arange(T) < lens                                   # [B, T] right-padded
st = DecayStyle("recent", gamma=1.0, lam=0.999)
xg = x.clone().requires_grad_(True)
up = torch.randn(B, T, generator=g)                             # [B, T] upstream grad
def clone(): x.clone()
def fwd(): F.eligibility_trace(x, mask, st, backend="cpp")
def fwdbwd():
    z = F.eligibility_trace(xg, mask, st, backend="cpp"); torch.autograd.grad(z, xg, up)
fns = {"clone": clone, "fwd": fwd, "fwdbwd": fwdbwd}
for f in fns.values():
    for _ in range(5): f()
ts = {k: [] for k in fns}
for r in range(200):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
mn = {k: min(v) * 1e3 for k, v in ts.items()}
print({k: round(v, 4) for k, v in med.items()}, "ms (median of 200 interleaved rounds)")
print(f"fwd/clone {med['fwd']/med['clone']:.2f}x (min-to-min {mn['fwd']/mn['clone']:.2f}x); "
      f"fwd+bwd/clone {med['fwdbwd']/med['clone']:.2f}x (min-to-min {mn['fwdbwd']/mn['clone']:.2f}x)")
