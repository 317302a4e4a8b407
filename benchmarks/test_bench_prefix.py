"""Benchmarks of the group prefix-tree TD error (issue 11, "Speed"): pytest-benchmark.

One group ``T=<T> prefix`` (``B = 64``, ``G = 8``, ``T = 4096``, one thread; quick mode:
``B = 8``, ``T = 1024``), every variant timed in the same process so the ratios are read within
one run:

* ``clone``: ``x.clone()`` of a float32 ``[B, T]`` (the memory floor);
* ``trace-fwdbwd``: ``eligibility_trace(x, mask, recent, gamma * lam = 0.999)`` forward plus the
  gradient for a fixed ``g`` (the issue's yardstick: "at most 10x the trace forward+backward");
* ``prefix_td``: ``F.prefix_td(tokens, mask, rewards, G)`` alone, right padding;
* ``prefix_td+gae``: ``F.traced_credit(F.prefix_td(...), mask, DecayStyle("recent", 1, 1))``
  (the issue's target), with right padding, left padding (``:left``) and several valid runs per
  row (``:multi``), and the step-level variant (``:step``, a boundary every ~20 tokens).

Tokens: completions that share prefixes (each copies a random earlier member of its group up to a
random cut). The fast path compares whole rows, so its cost does not depend on where they part.
``python benchmarks/report.py`` prints the ratios.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DECAY, quick_mode

G = 8


def _T(config) -> int:
    return 1024 if quick_mode(config) else 4096


_DATA: dict = {}


def _data(B: int, T: int):
    key = (B, T)
    if key not in _DATA:
        _DATA.clear()
        gen = torch.Generator().manual_seed(T)
        tok = torch.randint(0, 32000, (B, T), generator=gen)  # [B, T]
        for k in range(B // G):
            for i in range(1, G):
                j = k * G + int(torch.randint(0, i, (1,), generator=gen))
                cut = int(torch.randint(0, T, (1,), generator=gen))
                tok[k * G + i, :cut] = tok[j, :cut]
        lens = torch.randint(3 * T // 4, T + 1, (B, 1), generator=gen)  # [B, 1]
        ar = torch.arange(T)[None, :]  # [1, T]
        masks = {"right": ar < lens, "left": ar >= T - lens,  # [B, T] each
                 "multi": (ar < lens) & ~((ar % 512) < 64)}  # a 64-token gap every 512 (multi-turn)
        rewards = torch.randint(0, 2, (B,), generator=gen).float()  # [B]
        boundary = torch.rand(B, T, generator=gen) < 0.05  # [B, T] a step end every ~20 tokens
        x = torch.randn(B, T, generator=gen)  # [B, T]
        g = torch.randn(B, T, generator=gen)  # [B, T]
        _DATA[key] = (tok, masks, rewards, boundary, x, g)
    return _DATA[key]


def _run(benchmark, fn, T, variant):
    benchmark.group = f"T={T} prefix"
    benchmark.extra_info["variant"] = variant
    if not getattr(benchmark, "disabled", False):
        fn()  # warm-up
    return benchmark(fn)


def test_clone(benchmark, batch, pytestconfig):
    T = _T(pytestconfig)
    x = _data(batch, T)[4]
    out = _run(benchmark, lambda: x.clone(), T, "clone")
    assert out.shape == x.shape


def test_trace_fwdbwd(benchmark, batch, pytestconfig):
    from creditlib import functional as F
    from creditlib.style import DecayStyle

    T = _T(pytestconfig)
    tok, masks, rewards, boundary, x, g = _data(batch, T)
    style = DecayStyle("recent", gamma=1.0, lam=DECAY)
    xr = x.detach().clone().requires_grad_(True)  # [B, T]
    mask = masks["right"]

    def step():
        z = F.eligibility_trace(xr, mask, style)
        (gx,) = torch.autograd.grad(z, xr, g)
        return gx
    out = _run(benchmark, step, T, "trace-fwdbwd")
    assert out.shape == x.shape


def test_prefix_td(benchmark, batch, pytestconfig):
    from creditlib import functional as F

    T = _T(pytestconfig)
    tok, masks, rewards, boundary, x, g = _data(batch, T)
    out = _run(benchmark, lambda: F.prefix_td(tok, masks["right"], rewards, G), T, "prefix_td")
    torch.testing.assert_close(out.sum(1), F.group_advantage(rewards, G, baseline="loo"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["right", "left", "multi", "step"])
def test_prefix_td_gae(benchmark, batch, pytestconfig, layout):
    from creditlib import functional as F
    from creditlib.style import DecayStyle

    T = _T(pytestconfig)
    tok, masks, rewards, boundary, x, g = _data(batch, T)
    mask = masks["right" if layout == "step" else layout]
    bnd = boundary if layout == "step" else None
    if layout == "left":  # keep the shared prefixes aligned on the first valid token
        n = mask.sum(1)
        tok = torch.stack([torch.roll(tok[b], int(T - n[b])) for b in range(tok.shape[0])])
    gae = DecayStyle("recent", gamma=1.0, lam=1.0)

    def step():
        return F.traced_credit(F.prefix_td(tok, mask, rewards, G, boundary=bnd), mask, gae)
    variant = "prefix_td+gae" if layout == "right" else f"prefix_td+gae:{layout}"
    out = _run(benchmark, step, T, variant)
    # GAE(1, 1): the first valid token of each row carries the RLOO advantage
    first = mask.float().argmax(1)  # [B]
    torch.testing.assert_close(out.gather(1, first[:, None]).squeeze(1),
                               F.group_advantage(rewards, G, baseline="loo"), rtol=1e-4, atol=1e-4)


def test_interleaved_ratio(benchmark, batch, pytestconfig):
    """prefix_td + GAE / the trace forward+backward, timed interleaved in one loop (A and B
    alternate, so machine noise hits both), for every mask layout and the step variant. The
    ratios of the medians go to ``extra_info`` (wall clock, and process CPU time marked ``cpu``,
    which a busy shared machine inflates less); the benchmarked callable is one A/B pair."""
    import statistics
    import time

    from creditlib import functional as F
    from creditlib.style import DecayStyle

    T = _T(pytestconfig)
    tok, masks, rewards, boundary, x, g = _data(batch, T)
    style = DecayStyle("recent", gamma=1.0, lam=DECAY)
    gae = DecayStyle("recent", gamma=1.0, lam=1.0)
    xr = x.detach().clone().requires_grad_(True)  # [B, T]

    def trace():
        z = F.eligibility_trace(xr, masks["right"], style)
        return torch.autograd.grad(z, xr, g)[0]

    def prefix(layout):
        mask = masks["right" if layout == "step" else layout]
        bnd = boundary if layout == "step" else None
        return lambda: F.traced_credit(F.prefix_td(tok, mask, rewards, G, boundary=bnd), mask, gae)

    reps = 3 if getattr(benchmark, "disabled", False) else 25
    for layout in ("right", "left", "multi", "step"):
        fb = prefix(layout)
        trace(), fb()  # warm-up
        wall = {"a": [], "b": []}
        cpu = {"a": [], "b": []}
        for _ in range(reps):
            for f, k in ((trace, "a"), (fb, "b")):
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        name = "prefix_td+gae" + ("" if layout == "right" else f":{layout}") + "/trace-fwdbwd"
        benchmark.extra_info[name] = statistics.median(wall["b"]) / statistics.median(wall["a"])
        benchmark.extra_info[name + " cpu"] = statistics.median(cpu["b"]) / statistics.median(cpu["a"])
    fb = prefix("right")
    out = _run(benchmark, lambda: (trace(), fb())[1], T, "ratio:prefix")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
