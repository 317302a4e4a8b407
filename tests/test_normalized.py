"""Row-normalised traces and the sequence (GSPO) style, on every backend that runs here."""

import itertools

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.trace import Schedule, varlen_to_padded
from creditlib.ops.trace.naive import eligibility_trace_naive

from .conftest import available_backends

BACKENDS = available_backends()
NORM_STYLES = [("recent", 0.0), ("recent", 0.05), ("recent", 0.4), ("both", 0.0), ("both", 0.05), ("both", 1.0)]
DECAYS = [0.0, 0.5, 0.9, 0.99, 1.0]


def literal_normalized(T: int, style: DecayStyle) -> torch.Tensor:
    """w(t, j) / sum_{i<=t} w(t, i), written out in plain Python from docs/design.md section 2."""
    d = style.decay
    W = torch.zeros(T, T, dtype=torch.float64)
    for t in range(T):
        row = []
        for j in range(t + 1):
            w = d ** (t - j)  # Python: 0.0 ** 0 == 1.0
            if style.both:
                w = max(w, d**j)
            if style.eps > 0:
                w = max(w, style.eps)
            row.append(w)
        tot = sum(row)
        for j, w in enumerate(row):
            W[t, j] = w / tot
    return W


def masks(R: int, T: int, g: torch.Generator) -> dict:
    ar = torch.arange(T)
    lens = torch.randint(0, T + 1, (R, 1), generator=g)  # [R, 1]
    out = {
        "none": None,
        "right": ar[None] < lens,  # [R, T]
        "left": ar[None] >= lens,
        "runs": ((ar[None] < T // 3) | (ar[None] >= (2 * T) // 3)).expand(R, T).clone(),
        "random": torch.rand(R, T, generator=g) < 0.6,
    }
    mixed = torch.rand(R, T, generator=g) < 0.5  # [R, T]
    mixed[0] = False  # an all-masked row
    mixed[-1] = False
    mixed[-1, T // 2] = True  # a single valid token
    out["mixed"] = mixed
    # right padding except one row with a hole / one left-padded row in the second 16-row block (the C++
    # kernel's normalised "recent" path notices such rows mid-block and redoes that block)
    hole = out["right"].clone()
    if R > 17 and T > 2:
        hole[17] = True
        hole[17, 1] = False
        hole[R - 1] = ar >= 1
    out["right+hole"] = hole
    return out


# ----------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("style,eps", NORM_STYLES)
@pytest.mark.parametrize("d", DECAYS)
def test_normalized_weights_are_the_definition(style, eps, d):
    s = DecayStyle(style, gamma=1.0, lam=d, eps=eps, normalize=True)
    W = F.trace_weights(11, s)  # [11, 11]
    torch.testing.assert_close(W, literal_normalized(11, s), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(W.sum(-1), torch.ones(11, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    # the kernels' closed-form row sums N_t equal the dense row sums
    raw = F.trace_weights(11, DecayStyle(style, gamma=1.0, lam=d, eps=eps))  # [11, 11]
    torch.testing.assert_close(Schedule.of(s).row_sums(11), raw.sum(-1), rtol=1e-14, atol=0)


def test_normalized_special_cases():
    T = 9
    assert torch.equal(F.trace_weights(T, DecayStyle("recent", lam=0.0, normalize=True)),
                       torch.eye(T, dtype=torch.float64))  # d = 0 is still GRPO
    assert DecayStyle("recent", lam=0.0, normalize=True).is_identity()
    mean = torch.tril(torch.ones(T, T, dtype=torch.float64)) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(F.trace_weights(T, DecayStyle("recent", lam=1.0, normalize=True)), mean,
                               rtol=1e-15, atol=0)  # d = 1: causal running mean
    assert torch.equal(F.trace_weights(T, DecayStyle("sequence")), torch.full((T, T), 1.0 / T, dtype=torch.float64))


def test_sequence_ignores_gamma_lam_eps_normalize():
    x = torch.randn(3, 12, dtype=torch.float64)
    m = torch.rand(3, 12) < 0.6
    a = F.eligibility_trace(x, m, DecayStyle("sequence"))
    b = F.eligibility_trace(x, m, DecayStyle("sequence", gamma=0.3, lam=0.1, eps=0.5, normalize=True))
    assert torch.equal(a, b)
    assert not DecayStyle("sequence").is_identity() and DecayStyle("sequence").window is None
    with pytest.raises(ValueError, match="lam"):
        DecayStyle("sequence", lam=2.0)  # still range-checked
    with pytest.raises(ValueError, match="normalize"):
        DecayStyle("recent", normalize="yes")


# ----------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("kind,eps", NORM_STYLES + [("sequence", 0.0)])
def test_every_mask_and_dtype(backend, kind, eps):
    g = torch.Generator().manual_seed(3)
    for d, T in itertools.product([0.0, 0.9, 1.0], [1, 2, 37]):
        s = DecayStyle(kind, gamma=1.0, lam=d, eps=eps, normalize=True)
        R = 21  # a partial 16-row block (C++ AVX-512 paths) and a partial 16-column tile
        x = torch.randn(R, T, generator=g, dtype=torch.float64)  # [R, T]
        for name, m in masks(R, T, g).items():
            mm = torch.ones(R, T, dtype=torch.bool) if m is None else m
            xin = x if m is None else x.masked_fill(~m, float("nan"))  # masked inputs must be ignored
            for transpose in (False, True):
                want = eligibility_trace_naive(x, mm, s, transpose=transpose)  # [R, T]
                fn = F.traced_credit if transpose else F.eligibility_trace
                for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
                    got = fn(xin.to(dtype), m, s, backend=backend)
                    assert got.dtype == dtype
                    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol,
                                               msg=lambda e: f"{name} d={d} T={T} tr={transpose} {dtype}: {e}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,eps", [("recent", 0.0), ("both", 0.1), ("sequence", 0.0)])
def test_varlen_equals_padded(backend, kind, eps):
    s = DecayStyle(kind, lam=0.9, eps=eps, normalize=True)
    lens = torch.tensor([5, 0, 1, 17, 3, 40] + [7] * 12)  # [S] more than 16 segments
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [S+1]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        x = torch.randn(int(cu[-1]), dtype=dtype)  # [N]
        xp, m, _ = varlen_to_padded(x, cu)  # [S, Tmax]
        z = F.eligibility_trace_varlen(x, cu, s, backend=backend)
        torch.testing.assert_close(z, F.eligibility_trace(xp, m, s, backend="reference")[m], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("style", [DecayStyle("recent", 0.95, 0.9, normalize=True),
                                   DecayStyle("recent", 1.0, 0.8, eps=0.2, normalize=True),
                                   DecayStyle("both", 1.0, 0.7, normalize=True),
                                   DecayStyle("both", 0.9, 0.9, eps=0.1, normalize=True),
                                   DecayStyle("sequence")], ids=str)
def test_gradcheck_float64(backend, style):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 13, generator=g, dtype=torch.float64, requires_grad=True)  # [3, 13]
    m = torch.rand(3, 13, generator=g) < 0.7  # [3, 13]
    m[1] = False
    f = lambda v: F.eligibility_trace(v, m, style, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: F.traced_credit(v, m, style, backend=backend), (a,))
    lens = torch.tensor([4, 0, 7, 1])  # [S]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [S+1]
    xv = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)  # [N]
    assert torch.autograd.gradcheck(lambda v: F.eligibility_trace_varlen(v, cu, style, backend=backend), (xv,))


# ----------------------------------------------------------------------------- what they mean
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,eps", NORM_STYLES)
def test_normalized_credit_sums_to_grpo_credit(backend, kind, eps):
    """Rows of the normalised W sum to 1, so each sequence's forward-view credit sums to GRPO's."""
    s = DecayStyle(kind, lam=0.97, eps=eps, normalize=True)
    m = torch.rand(6, 50) < 0.7  # [6, 50]
    a = torch.randn(6, 50, dtype=torch.float64)  # [6, 50] per-token advantages
    c = F.traced_credit(a, m, s, backend=backend)
    torch.testing.assert_close(c.sum(-1), (a * m).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_is_the_gspo_ratio(backend):
    """Each valid token carries the sequence-level log-ratio mean_j x_j (GSPO's importance ratio), and
    the forward-view credit of a per-sequence advantage is that advantage on every valid token."""
    B, T = 5, 30
    m = torch.rand(B, T) < 0.7  # [B, T]
    logp, old = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    z = F.eligibility_trace(logp - old, m, DecayStyle("sequence"), backend=backend)  # [B, T]
    n = m.sum(-1).clamp_min(1)  # [B]
    seq = ((logp - old) * m).sum(-1) / n  # [B]
    torch.testing.assert_close(z, torch.where(m, seq[:, None].expand(B, T), torch.zeros(B, T, dtype=torch.float64)))
    adv = torch.randn(B, dtype=torch.float64)
    c = F.traced_credit(adv, m, DecayStyle("sequence"), backend=backend)
    torch.testing.assert_close(c, torch.where(m, adv[:, None].expand(B, T), torch.zeros(B, T, dtype=torch.float64)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_float32_no_overflow_no_precision_loss(backend):
    """T = 2^20 in float32 against the float64 computation: normalised outputs stay within float32
    rounding of the sum (checked against the scale of the *tail*, where a lost carry, an overflowing
    normaliser or a float32-rounded d would show), and nothing overflows."""
    T = 1 << 20
    g = torch.Generator().manual_seed(17)
    x = 1.0 + torch.randn(1, T, generator=g, dtype=torch.float64)  # [1, T] mean 1: well-conditioned means
    mask = torch.ones(1, T, dtype=torch.bool)  # [1, T]
    mask[0, T // 3: T // 3 + 1000] = False
    cases = [("recent", 1.0, 0.0, None), ("recent", 0.999, 0.0, mask), ("both", 0.999, 0.0, None),
             ("recent", 0.999, 0.01, mask), ("both", 0.9999, 0.001, mask), ("sequence", 1.0, 0.0, mask)]
    for kind, d, eps, m in cases:
        s = DecayStyle(kind, gamma=1.0, lam=d, eps=eps, normalize=True)
        for fn in (F.eligibility_trace, F.traced_credit):
            z32 = fn(x.float(), m, s, backend=backend)
            z64 = fn(x, m, s, backend=backend)
            assert bool(torch.isfinite(z32).all()), (kind, d, eps)
            tail = z64[:, T // 2:].abs().max().item()
            err = (z32.double() - z64)[:, T // 2:].abs().max().item()
            assert err <= 1e-4 * tail, (kind, d, eps, fn.__name__, err, tail)


def test_compiled_normalized_without_graph_breaks():
    s = DecayStyle("recent", lam=0.9, normalize=True)

    def loss(logp, old, m, adv):
        z = F.eligibility_trace(logp - old, m, s)  # [B, T]
        return -(torch.exp(z) * adv[:, None] * m).sum() / m.sum()

    B, T = 4, 40
    old, m, adv = torch.randn(B, T), torch.rand(B, T) < 0.8, torch.randn(B)
    lp1 = (old + 0.1 * torch.randn(B, T)).requires_grad_(True)
    lp2 = lp1.detach().clone().requires_grad_(True)
    l1 = torch.compile(loss, backend="aot_eager", fullgraph=True)(lp1, old, m, adv)
    l1.backward()
    l2 = loss(lp2, old, m, adv)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(lp1.grad, lp2.grad)
