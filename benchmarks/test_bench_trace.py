"""Benchmarks of the eligibility trace (issue 2, item 6): pytest-benchmark.

Groups ``T=<T> fwd`` and ``T=<T> fwdbwd`` hold, for one size and direction, every variant:

* ``<backend>:<style>``: ``creditlib.functional.eligibility_trace`` with ``backend="cpp"`` /
  ``"torch"`` and style ``recent``, ``both``, ``recent+eps``, ``both+eps`` (eps floor 0.05),
  ``gamma * lam = 0.999``, a right-padding bool mask (lengths in [3T/4, T]);
* ``dense``: the definition, ``x @ W^T`` with ``W = trace_weights(T)`` (only ``T <= 4096``);
* ``torchrl-conv``: TorchRL's ``vec_generalized_advantage_estimate`` with scalar gamma / lambda,
  which is its conv-based discounted sum (``_fast_vec_gae``: ``_custom_conv1d`` with a filter of
  ``ln(1e-7) / ln(gamma lam)`` taps, capped at T); only ``T <= 4096``, very few rounds;
* ``cumsum``: ``torch.cumsum`` (the scan floor); in ``fwdbwd`` its forward plus backward;
* ``clone``: ``x.clone()`` (the memory floor); forward only, in both groups: the issue's targets
  are multiples of the forward clone.

``python benchmarks/report.py`` runs the suite and prints each variant as a multiple of ``clone``
and of ``cumsum``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (BACKENDS, DECAY, DENSE_MAX_T, DIRECTIONS, STYLES, TORCHRL_MAX_T,
                      backend_status)


def _run(benchmark, fn, group, variant, *, rounds=None, warmup=1):
    """Benchmark ``fn`` in ``group``; ``rounds`` set: pedantic (fixed rounds, ``warmup`` rounds)."""
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    if rounds is not None:
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if not getattr(benchmark, "disabled", False):
        fn()  # warm-up (first-call allocations, lazy initialisation)
    return benchmark(fn)


def _group(T, direction):
    return f"T={T} {direction}"


def _fwd_or_fwdbwd(f, x, g, direction):
    """A callable timing ``f(x)`` (forward) or ``f(x)`` plus the gradient wrt ``x`` for ``g``."""
    if direction == "fwd":
        return lambda: f(x)
    xr = x.detach().clone().requires_grad_(True)  # [B, T]

    def step():
        z = f(xr)
        (gx,) = torch.autograd.grad(z, xr, g)
        return gx
    return step


@pytest.mark.parametrize("style_name", list(STYLES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_creditlib_trace(benchmark, inputs, T, direction, backend, style_name):
    reason = backend_status(backend)
    if reason is not None:
        pytest.skip(reason)
    from creditlib import functional as F
    from creditlib.style import DecayStyle

    x, mask, g = inputs
    st, eps = STYLES[style_name]
    style = DecayStyle(st, gamma=1.0, lam=DECAY, eps=eps)
    fn = _fwd_or_fwdbwd(lambda v: F.eligibility_trace(v, mask, style, backend=backend), x, g, direction)
    out = _run(benchmark, fn, _group(T, direction), f"{backend}:{style_name}")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dense(benchmark, inputs, T, direction):
    if T > DENSE_MAX_T:
        pytest.skip(f"dense [T, T] weights only up to T = {DENSE_MAX_T}")
    from creditlib import functional as F
    from creditlib.style import DecayStyle

    x, mask, g = inputs
    Wt = F.trace_weights(T, DecayStyle("recent", gamma=1.0, lam=DECAY)).to(torch.float32).T.contiguous()  # [T, T]
    maskf = mask.to(torch.float32)  # [B, T]; right padding: array position = valid-token index
    fn = _fwd_or_fwdbwd(lambda v: ((v * maskf) @ Wt) * maskf, x, g, direction)
    rounds = None if T <= 1024 else 5
    out = _run(benchmark, fn, _group(T, direction), "dense", rounds=rounds)
    assert out.shape == x.shape


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_torchrl_conv(benchmark, inputs, T, direction):
    if T > TORCHRL_MAX_T:
        pytest.skip(f"TorchRL's conv lambda-return is O(T^2) here: only up to T = {TORCHRL_MAX_T}")
    from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

    x, mask, g = inputs
    zeros = torch.zeros(*x.shape, 1)  # [B, T, 1]
    done = torch.zeros(*x.shape, 1, dtype=torch.bool)  # [B, T, 1]

    def conv(v):  # scalar gamma, lambda -> _fast_vec_gae: conv1d with a (gamma lambda)^k filter
        adv, _ = vec_generalized_advantage_estimate(1.0, DECAY, zeros, zeros, v.unsqueeze(-1), done)
        return adv.squeeze(-1)  # [B, T]

    fn = _fwd_or_fwdbwd(conv, x, g, direction)
    rounds, warmup = (3, 1) if T <= 1024 else (2, 0)
    out = _run(benchmark, fn, _group(T, direction), "torchrl-conv", rounds=rounds, warmup=warmup)
    assert out.shape == x.shape


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cumsum(benchmark, inputs, T, direction):
    x, mask, g = inputs
    fn = _fwd_or_fwdbwd(lambda v: torch.cumsum(v, -1), x, g, direction)
    out = _run(benchmark, fn, _group(T, direction), "cumsum")
    assert out.shape == x.shape


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_clone(benchmark, inputs, T, direction):
    x, mask, g = inputs
    out = _run(benchmark, x.clone, _group(T, direction), "clone")  # forward clone in both groups
    assert out.shape == x.shape
