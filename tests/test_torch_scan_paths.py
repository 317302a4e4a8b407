"""The pure-PyTorch trace's fast paths (issue 13 item 1) against the dense definition.

Right-padded rows take a scan that never masks its input forward and redoes only the chunk that
holds each row's end backward; these tests hold it (and the word-level right-padding check) to
``eligibility_trace_naive`` on awkward inputs: garbage, NaN and huge values in the padding, lengths
around chunk and word boundaries, the carry's closed form and its recursive fallback, ``d**C``
underflowing, many rows (the float-mask variant) and float64 gradients.
"""

from __future__ import annotations

import pytest
import torch

from creditlib import functional as F
from creditlib.ops.trace import torch_scan
from creditlib.ops.trace.naive import eligibility_trace_naive
from creditlib.style import DecayStyle


def _right_padded_mask(lens, T):
    return torch.arange(T)[None, :] < torch.as_tensor(lens)[:, None]  # [R, T]


def _check(x, mask, style, tol):
    for transpose in (False, True):
        fn = F.traced_credit if transpose else F.eligibility_trace
        got = fn(x, mask, style, backend="torch")
        clean = torch.where(mask, x, torch.zeros((), dtype=x.dtype))  # [R, T] what the definition reads
        want = eligibility_trace_naive(clean.double(), mask, style, transpose=transpose)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda e: f"transpose={transpose}: {e}")
        assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("T", [17, 40, 64, 129, 1000, 1029])
@pytest.mark.parametrize("lam", [0.999, 0.9, 0.3, 1e-3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("row_loop_min_t", [16, 1024])  # the row-by-row zeroing, and the float mask
def test_right_padded_with_garbage_padding(T, lam, normalize, row_loop_min_t, monkeypatch):
    monkeypatch.setattr(torch_scan, "ROW_LOOP_MIN_T", row_loop_min_t)
    g = torch.Generator().manual_seed(T)
    lens = [min(n, T) for n in (0, 1, T, T - 1, 15, 16, 17, T // 2, 8, 9)]  # [R] around chunk (16) / word (8) ends
    mask = _right_padded_mask(lens, T)  # [R, T]
    x = torch.randn(len(lens), T, generator=g, dtype=torch.float64)  # [R, T]
    x[~mask] = 1e30  # huge padding must never be read into a valid position
    _check(x, mask, DecayStyle("recent", gamma=1.0, lam=lam, normalize=normalize), 1e-10)


def test_nan_in_padding_and_in_valid_tokens():
    g = torch.Generator().manual_seed(0)
    T = 96
    mask = _right_padded_mask([90, 50, 96, 33], T)  # [R, T]
    x = torch.randn(4, T, generator=g)  # [R, T]
    x[~mask] = float("nan")
    style = DecayStyle("recent", lam=0.99)
    _check(x, mask, style, 1e-5)  # NaN only in padding: every output finite and right
    x[1, 20] = float("inf")  # a valid non-finite input reaches exactly its support
    z = F.eligibility_trace(x, mask, style, backend="torch")
    assert bool((~torch.isfinite(z[1, 20:50])).all())
    assert bool(torch.isfinite(z[1, :20]).all()) and bool((z[1, 50:] == 0).all())
    assert bool(torch.isfinite(z[[0, 2, 3]]).all())


def test_many_rows_float_mask_variant():
    g = torch.Generator().manual_seed(1)
    R, T = torch_scan.ROW_LOOP_MAX + 3, 48
    lens = torch.randint(0, T + 1, (R,), generator=g)
    mask = _right_padded_mask(lens, T)
    x = torch.randn(R, T, generator=g, dtype=torch.float64)
    x[~mask] = -1e9
    _check(x, mask, DecayStyle("recent", lam=0.95), 1e-10)


@pytest.mark.parametrize("lam,T", [(0.5, 3000), (1e-40, 100), (0.999, 5000)])
def test_carry_closed_form_fallback_and_underflow(lam, T):
    # 0.5: n (-ln a) > CARRY_MAX_EXP, the carries recurse; 1e-40: d**16 underflows to 0 in float64
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, T, generator=g, dtype=torch.float64)
    mask = _right_padded_mask([T, T - 5, T // 3], T)
    _check(x, mask, DecayStyle("recent", gamma=1.0, lam=lam), 1e-9)


def test_recent_scan_matches_the_recurrence_long():
    g = torch.Generator().manual_seed(3)
    T = 1 << 14
    x = torch.randn(2, T, generator=g, dtype=torch.float64)
    for d in (0.999, 0.9):
        for rev in (False, True):
            got = torch_scan.recent_scan(x, d, reverse=rev)
            want = torch.empty_like(x)
            acc = torch.zeros(2, dtype=torch.float64)
            order = range(T - 1, -1, -1) if rev else range(T)
            for t in order:  # the recurrence, plainly
                acc = d * acc + x[:, t]
                want[:, t] = acc
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_right_padded_check_against_a_plain_one():
    g = torch.Generator().manual_seed(5)
    for T in (8, 16, 24, 13, 64):
        for _ in range(60):
            R = 4
            if bool(torch.rand(1, generator=g) < 0.5):
                m = _right_padded_mask(torch.randint(0, T + 1, (R,), generator=g), T).to(torch.uint8)
                if bool(torch.rand(1, generator=g) < 0.5):
                    i, j = torch.randint(0, R, (1,), generator=g), torch.randint(0, T, (1,), generator=g)
                    m[i, j] = int(torch.tensor([0, 1, 2, 255, 128])[torch.randint(0, 5, (1,), generator=g)])
            else:
                m = (torch.rand(R, T, generator=g) < 0.6).to(torch.uint8)
            plain = None
            if not bool((m > 1).any()):
                n = m.sum(-1)
                if bool((m == _right_padded_mask(n, T).to(torch.uint8)).all()):
                    plain = n.tolist()
            got = torch_scan._right_padded(m)
            assert (None if got is None else got.tolist()) == plain, m


def test_gradcheck_right_padded_float64():
    g = torch.Generator().manual_seed(6)
    T = 37
    mask = _right_padded_mask([37, 20, 16, 0], T)
    x = torch.randn(4, T, generator=g, dtype=torch.float64, requires_grad=True)
    for style in (DecayStyle("recent", lam=0.8), DecayStyle("recent", lam=0.8, normalize=True)):
        assert torch.autograd.gradcheck(lambda v: F.eligibility_trace(v, mask, style, backend="torch"), (x,))



def _run_masks(R, T, g):
    """bool [R, T] masks made of runs: several per row, left padding, an all-masked row, runs that
    start and end inside and at the edges of the 16-token chunks, single valid tokens."""
    m = torch.zeros(R, T, dtype=torch.bool)
    for r in range(R):
        t = int(torch.randint(0, 20, (1,), generator=g))  # left padding
        while t < T:
            run = int(torch.randint(1, 60, (1,), generator=g))
            m[r, t: t + run] = True
            t += run + int(torch.randint(1, 40, (1,), generator=g))
    m[0] = False  # an all-masked row
    m[1] = True  # an all-valid row
    m[2, ::7] = True  # isolated valid tokens
    return m


@pytest.mark.parametrize("T", [16, 45, 300, 1024])
@pytest.mark.parametrize("lam", [0.999, 0.9, 0.2, 1e-3])
def test_runs_of_valid_tokens_with_garbage_between(T, lam):
    g = torch.Generator().manual_seed(T)
    mask = _run_masks(6, T, g)
    x = torch.randn(6, T, generator=g, dtype=torch.float64)
    x[~mask] = -1e30  # masked garbage is never read
    _check(x, mask, DecayStyle("recent", gamma=1.0, lam=lam), 1e-10)
    x[~mask] = float("nan")
    _check(x, mask, DecayStyle("recent", gamma=1.0, lam=lam), 1e-10)


def test_runs_float32_long_and_carry_fallback():
    g = torch.Generator().manual_seed(7)
    for lam, T in ((0.999, 4096), (0.5, 3000)):  # 0.5: d^-V would leave float64's range: general path
        mask = _run_masks(4, T, g)
        x = torch.randn(4, T, generator=g)
        _check(x, mask, DecayStyle("recent", gamma=1.0, lam=lam), 2e-5)


def test_runs_nan_at_a_valid_token_reaches_its_support():
    g = torch.Generator().manual_seed(8)
    T = 200
    mask = _run_masks(4, T, g)
    x = torch.randn(4, T, generator=g)
    r = 3
    j = int(mask[r].nonzero()[5])
    x[r, j] = float("nan")
    style = DecayStyle("recent", lam=0.9)
    z = F.eligibility_trace(x, mask, style, backend="torch")
    reach = mask[r] & (torch.arange(T) >= j)  # [T] later valid tokens
    assert bool(torch.isnan(z[r, reach]).all()) and bool(torch.isfinite(z[r, ~reach]).all())
    gback = F.traced_credit(x, mask, style, backend="torch")
    reach_b = mask[r] & (torch.arange(T) <= j)
    assert bool(torch.isnan(gback[r, reach_b]).all()) and bool(torch.isfinite(gback[r, ~reach_b]).all())


def test_gradcheck_runs_float64():
    g = torch.Generator().manual_seed(9)
    T = 70
    mask = _run_masks(4, T, g)
    x = torch.randn(4, T, generator=g, dtype=torch.float64, requires_grad=True)
    style = DecayStyle("recent", lam=0.7)
    assert torch.autograd.gradcheck(lambda v: F.eligibility_trace(v, mask, style, backend="torch"), (x,))
