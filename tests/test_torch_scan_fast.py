"""The pure-PyTorch trace's right-padded fast scan (issue 18, section 3) and its right-padding mask check.

``_padded_scan`` folds the chunk carries into one ``addcmul_`` as ``d^(t+1) cumsum(d^(-C k) e_k)``,
which holds only while ``T (-ln d)`` stays inside the dtype's range (``FAST_MAX_EXP``); past it the
float64-carry scan takes over. These tests pin both sides of that limit to the plain recurrence,
prove which scan ran, feed non-finite and huge padding through the zeroing of the padding, and hold
the right-padding check (on the mask bytes) to a plain one on hand-made masks.
"""

from __future__ import annotations

import math

import pytest
import torch

from creditlib import functional as F
from creditlib.ops.trace import torch_scan
from creditlib.style import DecayStyle


def _mask(lens, T):
    return torch.arange(T)[None, :] < torch.as_tensor(lens)[:, None]  # [R, T] right padded


def _recurrence(x: torch.Tensor, mask: torch.Tensor, d: float, reverse: bool) -> torch.Tensor:
    """``r_t = d r_{t-1} + x_t`` over the valid prefix of each row (reverse: the suffix form), float64."""
    x = torch.where(mask, x.double(), torch.zeros((), dtype=torch.float64))  # [R, T]
    out = torch.zeros_like(x)  # [R, T]
    acc = torch.zeros(x.shape[0], dtype=torch.float64)  # [R]
    for t in (range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])):
        acc = d * acc + x[:, t]
        out[:, t] = acc
    return torch.where(mask, out, torch.zeros((), dtype=torch.float64))


def _t_at(limit: float, d: float, below: bool) -> int:
    """A length whose whole chunks put ``n * CHUNK * (-ln d)`` just below (or just above) ``limit``."""
    C = torch_scan.CHUNK
    n = math.floor(limit / (C * -math.log(d)))
    return n * C - 3 if below else (n + 1) * C


def _forbid_float64_carry_scan(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the float64-carry scan ran where the fast scan applies")

    monkeypatch.setattr(torch_scan, "_scan", refuse)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 0.98), (torch.float64, 0.8)])
@pytest.mark.parametrize("below", [True, False])
def test_both_sides_of_the_range_limit_match_the_recurrence(dtype, d, below, monkeypatch):
    T = _t_at(torch_scan.FAST_MAX_EXP[dtype], d, below)
    assert (torch_scan._padded_scan_applies(T, d, dtype) is not None) == below
    if below:
        _forbid_float64_carry_scan(monkeypatch)
    g = torch.Generator().manual_seed(T)
    lens = [T, T - 1, 16, 17, 0, T // 2, 1]  # [R] around chunk ends, empty and full rows
    mask = _mask(lens, T)
    x = torch.randn(len(lens), T, generator=g, dtype=torch.float64)  # [R, T]
    x[~mask] = 1e3 * torch.randn(int((~mask).sum()), generator=g, dtype=torch.float64)  # garbage padding
    style = DecayStyle("recent", gamma=1.0, lam=d)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    for reverse, fn in ((False, F.eligibility_trace), (True, F.traced_credit)):
        got = fn(x.to(dtype), mask, style, backend="torch")
        want = _recurrence(x.to(dtype), mask, d, reverse)
        scale = want.abs().amax(-1, keepdim=True).clamp_min(1.0)  # [R, 1]
        err = ((got.double() - want).abs() / scale).max().item()
        assert err < tol, (reverse, err)
        assert bool((got[~mask] == 0).all())


def test_fast_scan_is_taken_at_the_benchmark_shape_and_matches_the_carry_scan(monkeypatch):
    # B = 8 of the T = 16384 at gamma*lam = 0.999 (float32): the fast scan, within float32
    # rounding of the float64-carry scan, forward and transposed
    T, d = 16384, 0.999
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(T // 2, T + 1, (8,), generator=g)
    mask = _mask(lens, T)
    x = 0.01 * torch.randn(8, T, generator=g)  # [8, T]
    up = torch.randn(8, T, generator=g)  # [8, T]
    st = DecayStyle("recent", gamma=1.0, lam=d)
    want_f = F.eligibility_trace(x.double(), mask, st, backend="torch")
    want_b = F.traced_credit(up.double(), mask, st, backend="torch")
    _forbid_float64_carry_scan(monkeypatch)
    got_f = F.eligibility_trace(x, mask, st, backend="torch")
    got_b = F.traced_credit(up, mask, st, backend="torch")
    assert (got_f.double() - want_f).abs().max().item() <= 2e-6 * want_f.abs().max().item()
    assert (got_b.double() - want_b).abs().max().item() <= 2e-6 * want_b.abs().max().item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_nonfinite_or_huge_padding_through_the_row_zeroing(bad):
    # T >= ROW_LOOP_MIN_T and few rows: the padding is zeroed row by row, never multiplied
    T = torch_scan.ROW_LOOP_MIN_T + 37
    g = torch.Generator().manual_seed(2)
    lens = [T, T - 20, 700, 16, 0]
    mask = _mask(lens, T)
    x = torch.randn(len(lens), T, generator=g)  # [R, T] float32
    x[~mask] = bad
    style = DecayStyle("recent", lam=0.99)
    for reverse, fn in ((False, F.eligibility_trace), (True, F.traced_credit)):
        got = fn(x, mask, style, backend="torch")
        want = _recurrence(x, mask, 0.99, reverse)
        assert bool(torch.isfinite(got).all()), reverse
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert bool((got[~mask] == 0).all())


def test_nonfinite_valid_input_on_the_fast_scan_reaches_its_support():
    T = 2000
    mask = _mask([T, 1500, 900], T)
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(3))  # [3, T]
    x[1, 100] = -float("inf")
    style = DecayStyle("recent", lam=0.99)
    z = F.eligibility_trace(x, mask, style, backend="torch")
    assert bool((z[1, 100:1500] == -float("inf")).all()) and bool(torch.isfinite(z[1, :100]).all())
    assert bool((z[1, 1500:] == 0).all()) and bool(torch.isfinite(z[[0, 2]]).all())
    c = F.traced_credit(x, mask, style, backend="torch")
    assert bool((c[1, :101] == -float("inf")).all()) and bool(torch.isfinite(c[1, 101:]).all())


def _plain_right_padded(m: torch.Tensor):
    """Bytewise: the row lengths when every byte is 0/1 and the valid bytes form a prefix, else None."""
    if bool((m > 1).any()):
        return None
    n = m.long().sum(-1)  # [R]
    return n.tolist() if bool((m == _mask(n, m.shape[1]).to(torch.uint8)).all()) else None


def test_right_padded_word_check_on_hand_made_words():
    T = 64  # 8 words of 8 bytes
    for n in range(T + 1):  # every valid length, alone and beside a full and an empty row
        m = _mask([n, T, 0], T).to(torch.uint8)
        assert torch_scan._right_padded(m).tolist() == [n, T, 0]
    corrupt = {
        "byte 2 in a full word": (3, 2),
        "byte 2 in the partial word": (17, 2),
        "byte 255 at a word's top (a negative word)": (7, 255),
        "byte 128 in the last word": (63, 128),
        "a valid token after the padding": (40, 1),
        "a hole inside the partial word": (9, 0),
        "a hole in a full word": (2, 0),
    }
    for what, (pos, val) in corrupt.items():
        m = _mask([20, T, 0], T).to(torch.uint8)
        m[0, pos] = val
        assert _plain_right_padded(m) is None, what
        assert torch_scan._right_padded(m) is None, what
    m = torch.zeros(2, T, dtype=torch.uint8)
    m[0, :8] = 1
    m[0, 8:10] = 1  # a second partial word after a full one is fine (one partial word)...
    assert torch_scan._right_padded(m).tolist() == [10, 0]
    m[0, 16] = 1  # ...two partial words are not
    assert torch_scan._right_padded(m) is None
    # a mask whose storage is not 8-byte aligned takes the bytewise check, with the same answers
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        rows = _mask(torch.randint(0, T + 1, (3,), generator=g), T).to(torch.uint8)  # [3, T]
        if bool(torch.rand(1, generator=g) < 0.5):
            rows[int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, T, (1,), generator=g))] ^= 1
        buf = torch.zeros(3 * T + 1, dtype=torch.uint8)
        buf[1:] = rows.view(-1)
        shifted = buf[1:].view(3, T)  # storage offset 1
        want = _plain_right_padded(rows)
        for m in (rows, shifted):
            got = torch_scan._right_padded(m)
            assert (None if got is None else got.tolist()) == want


def test_all_valid_masks_take_the_unmasked_path():
    T = 1040
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, T, generator=g)
    st = DecayStyle("recent", lam=0.995)
    free = F.eligibility_trace(x, None, st, backend="torch")
    ones = F.eligibility_trace(x, torch.ones(3, T, dtype=torch.bool), st, backend="torch")
    odd = torch.full((3, T), 7, dtype=torch.uint8).view(torch.bool)  # nonzero bytes other than 1
    assert torch.equal(ones, free)
    assert torch.equal(F.eligibility_trace(x, odd, st, backend="torch"), free)
