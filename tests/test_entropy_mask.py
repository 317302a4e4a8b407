"""F.entropy_mask: top-quantile entropy tokens, held against a Python-sort definition and TRL's own
GRPOTrainer.get_high_entropy_mask (real TRL 1.16 code on CPU, with a real single-process
accelerate.Accelerator), including inputs past torch.quantile's 2**24-element limit."""

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.entropy import _quantile_kth, entropy_mask_naive


def _inputs(seed, shape, kind="multi", dtype=torch.float32, ties=False):
    gen = torch.Generator().manual_seed(seed)
    ent = torch.rand(shape, generator=gen) * 3  # entropies are >= 0
    if ties:
        ent = (ent * 4).round() / 4  # many equal values
    T = shape[-1]
    if kind == "full":
        mask = torch.ones(shape, dtype=torch.bool)
    elif kind == "right":
        lens = torch.randint(0, T + 1, shape[:-1] + (1,), generator=gen)
        mask = torch.arange(T) < lens
    else:
        mask = torch.rand(shape, generator=gen) < 0.6
    ent = torch.where(mask, ent, torch.full_like(ent, float("nan")))  # masked entries are ignored
    return ent.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["full", "right", "multi"])
def test_matches_definition(dtype, kind):
    for seed, q in enumerate([0.2, 0.5, 0.8, 1.0, 1e-3, 0.37]):
        ent, mask = _inputs(seed, (6, 33), kind, dtype, ties=seed % 2 == 0)
        got = F.entropy_mask(ent, mask, q)
        assert got.dtype == torch.bool and got.shape == mask.shape
        torch.testing.assert_close(got, entropy_mask_naive(ent, mask, q), rtol=0, atol=0)
        assert not bool((got & ~mask).any())


def test_quantile_one_keeps_every_valid_token_and_empty_masks():
    ent, mask = _inputs(0, (4, 20))
    assert torch.equal(F.entropy_mask(ent, mask, 1.0), mask)
    none = torch.zeros_like(mask)
    assert torch.equal(F.entropy_mask(ent, none, 0.2), none)
    # the fraction kept is about the quantile (ties aside)
    ent, mask = _inputs(1, (16, 500), "full")
    frac = F.entropy_mask(ent, mask, 0.2).float().mean().item()
    assert abs(frac - 0.2) < 0.01
    # any leading shape [..., T]
    ent3, mask3 = _inputs(2, (2, 3, 11))
    torch.testing.assert_close(F.entropy_mask(ent3, mask3, 0.3), entropy_mask_naive(ent3, mask3, 0.3))


def test_mask_bytes_other_than_one():
    ent, mask = _inputs(3, (5, 30))
    odd = (mask.to(torch.uint8) * torch.randint(1, 255, mask.shape, dtype=torch.uint8)).view(torch.bool)
    got = F.entropy_mask(ent, odd, 0.3)
    assert torch.equal(got.view(torch.uint8).clamp_max(1), F.entropy_mask(ent, mask, 0.3).view(torch.uint8))
    assert set(got.view(torch.uint8).unique().tolist()) <= {0, 1}


@pytest.fixture(scope="module")
def trl_self():
    """What GRPOTrainer.get_high_entropy_mask reads from ``self``: its accelerator (a real,
    single-process one). No flags, so it joins any accelerate state an earlier test set up; a
    state this fixture created is reset afterwards, so later trainers choose their own settings."""
    from types import SimpleNamespace

    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, is_initialized

    fresh = not is_initialized()
    yield SimpleNamespace(accelerator=accelerate.Accelerator())
    if fresh:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equals_trl_helper(trl_self, dtype):
    trl = pytest.importorskip("trl")
    helper = trl.GRPOTrainer.get_high_entropy_mask
    for seed, rho in enumerate([0.2, 0.5, 0.8, 0.05, 1.0]):
        ent, mask = _inputs(seed, (8, 64), "right" if seed % 2 else "multi", dtype, ties=seed % 3 == 0)
        ent = torch.where(mask, ent, torch.zeros_like(ent))  # TRL multiplies by the mask: no NaN there
        # TRL: top_entropy_quantile = rho -> threshold argument 1 - rho
        want = helper(trl_self, ent, mask.long(), 1 - rho)
        got = F.entropy_mask(ent, mask, rho)
        assert torch.equal(got, want), (seed, rho)
    # no valid tokens: both all False
    zero = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(helper(trl_self, torch.rand(2, 5), zero.long(), 0.8),
                       F.entropy_mask(torch.rand(2, 5), zero, 0.2))


def test_quantile_kth_equals_torch_quantile():
    """The kthvalue form used past 2**24 elements equals torch.quantile bit for bit where both run."""
    gen = torch.Generator().manual_seed(0)
    for N in [1, 2, 3, 7, 10, 101, 1000, 4097]:
        v = torch.rand(N, generator=gen)
        if N > 3:
            v[: N // 3] = v[N // 2]  # ties
        for p in [0.0, 0.2, 0.5, 0.8, 0.999, 1.0, 1 - 0.2, 0.123456]:
            assert torch.equal(_quantile_kth(v, p), torch.quantile(v, p)), (N, p)


def test_beyond_torch_quantile_limit():
    """More than 2**24 valid tokens (torch.quantile raises there): the same definition, checked by
    counting (the kept tokens are the top ones, as many as the interpolated rank allows)."""
    N = (1 << 24) + 1001
    gen = torch.Generator().manual_seed(1)
    ent = torch.rand(1, N, generator=gen)  # [1, N]
    mask = torch.ones_like(ent, dtype=torch.bool)
    mask[0, :7] = False  # still > 2**24 valid
    vals = ent[mask]  # [M]
    M = vals.numel()
    assert M > (1 << 24)
    with pytest.raises(RuntimeError):
        torch.quantile(vals, 0.8)
    got = F.entropy_mask(ent, mask, 0.2)
    assert not bool((got & ~mask).any())
    kept, dropped = ent[got], ent[mask & ~got]
    assert kept.min() > dropped.max()  # a threshold separates them
    lo = int(0.8 * (M - 1))  # q lies in [v_(lo), v_(lo + 1)] (0-based order statistics)
    n_ties = int((vals == kept.min()).sum())
    assert M - lo - 1 <= kept.numel() <= M - lo + n_ties - 1
    # and the threshold is the interpolated order statistic itself: the smallest kept value is
    # v_(lo + 1) unless q == v_(lo)
    v_lo = torch.kthvalue(vals, lo + 1).values
    v_hi = torch.kthvalue(vals, lo + 2).values
    assert kept.min() in (v_lo, v_hi)


def test_as_trace_mask():
    """entropy_mask as the trace's mask: a trace over the selected tokens only."""
    ent, mask = _inputs(5, (3, 40), "right")
    keep = F.entropy_mask(ent, mask, 0.3)  # [3, 40]
    x = torch.randn(3, 40, dtype=torch.float64)
    style = DecayStyle("recent", gamma=1.0, lam=0.9)
    z = F.eligibility_trace(x, keep, style)
    for b in range(3):
        cols = keep[b].nonzero().squeeze(1)
        sel = x[b, cols][None]  # [1, n] the selected tokens, adjacent
        want = F.eligibility_trace_naive(sel, torch.ones_like(sel, dtype=torch.bool), style)[0]
        torch.testing.assert_close(z[b, cols], want, rtol=0, atol=1e-12)
        assert bool((z[b][~keep[b]] == 0).all())


@pytest.mark.parametrize("args,match", [
    ((torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0), "quantile"),
    ((torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.5), "quantile"),
    ((torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), float("nan")), "quantile"),
    ((torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), True), "quantile"),
    ((torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), -0.2), "quantile"),
    ((torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 0.2), "entropy"),
    ((torch.rand(2, 3), torch.ones(2, 3), 0.2), "mask"),
    ((torch.rand(2, 3), torch.ones(2, 4, dtype=torch.bool), 0.2), "mask"),
    ((torch.tensor([[0.1, float("nan")]]), torch.ones(1, 2, dtype=torch.bool), 0.2), r"entropy\[\(0, 1\)\]"),
    ((torch.tensor([[float("inf"), 0.1]]), torch.ones(1, 2, dtype=torch.bool), 0.2), "entropy"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        F.entropy_mask(*args)
