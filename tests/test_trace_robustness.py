"""Nothing lost, nothing spread: empty inputs, non-finite valid tokens, odd bool bytes, bad rewards.

Each test here failed on creditlib 0.1 (T = 0 raised "cannot reshape"; the PyTorch path spread a NaN
to earlier tokens through 0 * inf in its chunked matmul; a mask byte of 2 counted twice there; a
NaN reward silently zeroed its group).
"""

import itertools

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.trace.naive import trace_support

from .conftest import available_backends

BACKENDS = available_backends()
ALL = BACKENDS + ["reference"]
STYLE_GRID = [DecayStyle(k, gamma=1.0, lam=d, eps=e, normalize=n)
              for k, d, e, n in itertools.product(("recent", "both"), (0.0, 0.6, 1.0), (0.0, 0.1), (False, True))]
STYLE_GRID.append(DecayStyle("sequence"))


# ----------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("backend", ALL)
def test_zero_length_rows(backend):
    s = DecayStyle("both", lam=0.9, eps=0.1)
    x = torch.randn(3, 0, requires_grad=True)  # [3, 0]
    m = torch.ones(3, 0, dtype=torch.bool)  # [3, 0]
    z = F.eligibility_trace(x, m, s, backend=backend)
    assert z.shape == (3, 0) and z.dtype == x.dtype
    z.sum().backward()
    assert x.grad.shape == (3, 0)
    assert F.eligibility_trace(torch.randn(2, 4, 0), None, s, backend=backend).shape == (2, 4, 0)
    adv = torch.randn(3, requires_grad=True)
    c = F.traced_credit(adv, m, s, backend=backend)
    assert c.shape == (3, 0)
    c.sum().backward()
    assert adv.grad.shape == (3,) and bool((adv.grad == 0).all())
    for cu in (torch.zeros(1, dtype=torch.long), torch.zeros(4, dtype=torch.int32)):
        xv = torch.randn(0, requires_grad=True)  # [N = 0]
        zv = F.eligibility_trace_varlen(xv, cu, s, backend=backend)
        assert zv.shape == (0,)
        zv.sum().backward()
        assert xv.grad.shape == (0,)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("style", [DecayStyle("recent"), DecayStyle("both", normalize=True), DecayStyle("sequence")],
                         ids=str)
def test_empty_batch_keeps_the_graph(backend, style):
    x = torch.randn(0, 7, requires_grad=True)  # [B = 0, T]
    z = F.eligibility_trace(x, torch.zeros(0, 7, dtype=torch.bool), style, backend=backend)
    assert z.shape == (0, 7) and z.requires_grad
    z.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 7)
    adv = torch.randn(0, requires_grad=True)
    c = F.traced_credit(adv, torch.zeros(0, 7, dtype=torch.bool), style, backend=backend)
    c.sum().backward()
    assert adv.grad.shape == (0,)


# ----------------------------------------------------------------------------- non-finite valid tokens
def _expected_reach(bad: torch.Tensor, mask: torch.Tensor, style: DecayStyle, transpose: bool) -> torch.Tensor:
    """bool [R, T]: valid outputs whose weight includes a bad valid input (trace_support, per row)."""
    R, T = mask.shape
    out = torch.zeros(R, T, dtype=torch.bool)
    for r in range(R):
        idx = mask[r].nonzero()[:, 0]  # array positions of the valid tokens
        S = trace_support(len(idx), style)  # [n, n]
        if transpose:
            S = S.T
        b = bad[r, idx]  # [n]
        out[r, idx] = (S & b[None, :]).any(-1)
    return out


@pytest.mark.parametrize("style", STYLE_GRID, ids=str)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_nonfinite_valid_token_reaches_only_its_support(style, fill):
    """Same pattern of non-finite outputs on every backend, equal to the support of the weights
    (NaN in: exactly those outputs NaN); every other output equals the clean result."""
    g = torch.Generator().manual_seed(2)
    R, T = 6, 70  # longer than the PyTorch path's 32-token chunks
    x = torch.randn(R, T, generator=g, dtype=torch.float64)  # [R, T]
    mask = torch.rand(R, T, generator=g) < 0.7  # [R, T]
    mask[1] = True
    mask[2] = torch.arange(T) < 50  # right padding
    mask[3] = torch.arange(T) >= 20  # left padding
    bad = torch.zeros(R, T, dtype=torch.bool)
    bad[0, 40] = bad[1, 35] = bad[2, 10] = bad[3, 69] = bad[4, 33] = True  # row 5 stays clean
    bad[1, 0] = True  # the first token (the "both" style's early weight)
    bad &= mask
    xb = x.masked_fill(bad, fill)
    xb = xb.masked_fill(~mask, float("nan"))  # masked inputs are still ignored
    for transpose in (False, True):
        fn = F.traced_credit if transpose else F.eligibility_trace
        reach = _expected_reach(bad, mask, style, transpose)  # [R, T]
        clean = F.eligibility_trace(x, mask, style, backend="reference") if not transpose else \
            F.traced_credit(x, mask, style, backend="reference")
        for backend in ALL:
            for dtype in (torch.float64, torch.float32):
                z = fn(xb.to(dtype), mask, style, backend=backend)
                assert torch.equal(~torch.isfinite(z), reach), (backend, dtype, transpose)
                if fill != fill:  # NaN in, NaN out
                    assert torch.equal(torch.isnan(z), reach), (backend, dtype, transpose)
                assert bool((z[~mask] == 0).all())
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(z.double()[~reach], clean[~reach], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- odd bool bytes
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("style", STYLE_GRID[::3] + [DecayStyle("recent", lam=0.9), DecayStyle("sequence")], ids=str)
def test_bool_masks_with_bytes_other_than_one(backend, style):
    g = torch.Generator().manual_seed(4)
    R, T = 19, 45
    raw = torch.randint(0, 4, (R, T), generator=g, dtype=torch.uint8) * 85  # [R, T] bytes 0, 85, 170, 255
    raw[0] = torch.tensor([0, 2, 255] * 15, dtype=torch.uint8)
    raw[1, :30] = 7  # right-padded row with byte 7
    raw[1, 30:] = 0
    right = (torch.arange(T)[None] < torch.randint(0, T + 1, (R, 1), generator=g)).to(torch.uint8) * 2  # [R, T]
    x = torch.randn(R, T, generator=g)
    for raw_m in (raw, right):  # scattered bytes; every row right-padded with byte 2
        odd = raw_m.view(torch.bool)  # [R, T] a bool tensor whose bytes are not 0/1
        canon = raw_m != 0  # [R, T]
        for dtype in (torch.float32, torch.float64):
            for fn in (F.eligibility_trace, F.traced_credit):
                want = fn(x.to(dtype), canon, style, backend=backend)
                got = fn(x.to(dtype), odd, style, backend=backend)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        c = F.traced_credit(torch.randn(R, dtype=dtype), odd, style, backend=backend)
        assert bool((c[~canon] == 0).all())


# ----------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_group_advantage_rejects_nonfinite_rewards(bad):
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    r[3] = bad
    r2 = r.clone()
    r2[5] = bad
    for kw in (dict(group_size=3), dict(group_ids=torch.tensor([0, 0, 1, 1, 2, 2]))):
        with pytest.raises(ValueError, match=r"rewards\[3\]"):
            F.group_advantage(r, **kw)
        with pytest.raises(ValueError, match=r"rewards\[3\]"):  # the first bad index
            F.group_advantage(r2, **kw)
