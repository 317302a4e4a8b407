"""creditlib.functional against its definitions, on every backend that runs here."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.trace.naive import eligibility_trace_naive

from .conftest import available_backends

BACKENDS = available_backends()
DECAYS = [0.0, 0.5, 0.9, 0.99, 1.0]
STYLES = [("recent", 0.0), ("recent", 0.05), ("recent", 0.3), ("both", 0.0), ("both", 0.05), ("both", 1.0)]


def literal_weight(t: int, j: int, style: DecayStyle) -> float:
    """w(t, j) exactly as docs/design.md section 2 writes it, in plain Python."""
    if j > t:
        return 0.0
    d = style.decay
    w = d ** (t - j)  # Python: 0.0 ** 0 == 1.0
    if style.both:
        w = max(w, d**j)
    if style.eps > 0:
        w = max(w, style.eps)
    return w


def masks(R: int, T: int, g: torch.Generator):
    """Every mask shape a pipeline produces."""
    ar = torch.arange(T)
    lens = torch.randint(0, T + 1, (R, 1), generator=g)
    two_runs = (ar[None] < T // 3) | (ar[None] >= (2 * T) // 3)  # a user turn masked out
    out = {
        "all": torch.ones(R, T, dtype=torch.bool),
        "right": ar[None] < lens,
        "left": ar[None] >= lens,
        "runs": two_runs.expand(R, T).clone(),
        "random": torch.rand(R, T, generator=g) < 0.6,
        "none_valid": torch.zeros(R, T, dtype=torch.bool),
    }
    out["mixed"] = out["random"].clone()
    out["mixed"][0] = False  # an all-masked row beside others
    if T > 1:
        out["mixed"][-1] = False
        out["mixed"][-1, T // 2] = True  # a single valid token
    return out


# ----------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("style,eps", STYLES)
@pytest.mark.parametrize("d", DECAYS)
def test_trace_weights_is_the_definition(style, eps, d):
    s = DecayStyle(style, gamma=1.0, lam=d, eps=eps)
    T = 9
    W = F.trace_weights(T, s)
    assert W.dtype == torch.float64 and W.shape == (T, T)
    for t, j in itertools.product(range(T), range(T)):
        assert W[t, j].item() == pytest.approx(literal_weight(t, j, s), rel=1e-15, abs=0)
    assert torch.all(torch.diagonal(W) == 1)


def test_recent_with_zero_decay_is_plain_grpo():
    x = torch.randn(3, 11, dtype=torch.float64)
    m = torch.rand(3, 11) < 0.7
    for b in BACKENDS:
        z = F.eligibility_trace(x, m, DecayStyle("recent", lam=0.0), backend=b)
        assert torch.equal(z, torch.where(m, x, torch.zeros_like(x)))


def test_gamma_times_lam_is_the_decay():
    x = torch.randn(2, 20, dtype=torch.float64)
    a = F.eligibility_trace(x, None, DecayStyle("recent", gamma=0.9, lam=0.5))
    b = F.eligibility_trace(x, None, DecayStyle("recent", gamma=1.0, lam=0.45))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- fast paths vs dense
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style,eps", STYLES)
@pytest.mark.parametrize("d", DECAYS)
def test_every_mask_float64(backend, style, eps, d):
    s = DecayStyle(style, gamma=1.0, lam=d, eps=eps)
    g = torch.Generator().manual_seed(1)
    for T in (1, 2, 7, 40):
        x = torch.randn(5, T, dtype=torch.float64, generator=g)
        for name, m in masks(5, T, g).items():
            for transpose in (False, True):
                fn = F.traced_credit if transpose else F.eligibility_trace
                got = fn(x, m, s, backend=backend)
                want = eligibility_trace_naive(x, m, s, transpose=transpose)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                           msg=lambda e: f"{name} T={T} transpose={transpose}: {e}")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_float32(backend, data):
    T = data.draw(st.integers(1, 70), label="T")
    R = data.draw(st.integers(1, 4), label="R")
    style = data.draw(st.sampled_from(["recent", "both"]), label="style")
    d = data.draw(st.sampled_from([0.0, 0.5, 0.99, 1.0]) | st.floats(0, 1), label="d")
    eps = data.draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0, 1), label="eps")
    bits = data.draw(st.lists(st.booleans(), min_size=R * T, max_size=R * T), label="mask")
    s = DecayStyle(style, gamma=1.0, lam=d, eps=eps)
    m = torch.tensor(bits).view(R, T)
    x = torch.randn(R, T)
    x[~m] = float("nan")  # masked inputs must be ignored
    z = F.eligibility_trace(x, m, s, backend=backend)
    want = eligibility_trace_naive(x.double(), m, s)
    assert z.dtype == torch.float32
    scale = 1.0 + want.abs().max().item()
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5 * scale)
    c = F.traced_credit(x, m, s, backend=backend)
    want_c = eligibility_trace_naive(x.double(), m, s, transpose=True)
    torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-5 * (1.0 + want_c.abs().max().item()))


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style,eps", [("recent", 0.0), ("recent", 0.2), ("both", 0.0), ("both", 0.2)])
def test_gradcheck_float64(backend, style, eps):
    s = DecayStyle(style, gamma=0.95, lam=0.9, eps=eps)
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 13) < 0.7
    m[1] = False
    assert torch.autograd.gradcheck(lambda v: F.eligibility_trace(v, m, s, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(lambda v: F.eligibility_trace(v, m, s, backend=backend), (x,))
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: F.traced_credit(v, m, s, backend=backend), (a,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_at_masked_positions_never_leak(backend):
    s = DecayStyle("both", lam=0.9, eps=0.05)
    x = torch.randn(4, 30, requires_grad=False)
    m = torch.rand(4, 30) < 0.5
    m[:, 0] = False
    x = torch.where(m, x, torch.tensor(float("nan")))
    x[~m & (torch.rand(4, 30) < 0.5)] = float("inf")
    x.requires_grad_(True)
    z = F.eligibility_trace(x, m, s, backend=backend)
    assert torch.isfinite(z).all() and (z[~m] == 0).all()
    (z * torch.randn_like(z)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~m] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style,eps", [("recent", 0.0), ("recent", 0.1), ("both", 0.0), ("both", 0.1)])
def test_forward_view_equals_backward_view_at_ratio_one(backend, style, eps):
    """d/d logp of sum_t A_t exp(z_t) at logp = old equals traced_credit(A): the two views agree."""
    s = DecayStyle(style, gamma=1.0, lam=0.9, eps=eps)
    B, T = 4, 25
    m = torch.rand(B, T) < 0.8
    old = torch.randn(B, T, dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.randn(B, dtype=torch.float64)
    z = F.eligibility_trace(logp - old, m, s, backend=backend)
    surrogate = (torch.exp(z) * adv[:, None] * m).sum()
    (grad,) = torch.autograd.grad(surrogate, logp)
    torch.testing.assert_close(grad, F.traced_credit(adv, m, s, backend=backend), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style,eps", [("recent", 0.0), ("both", 0.1)])
def test_varlen_equals_padded(backend, style, eps):
    s = DecayStyle(style, lam=0.8, eps=eps)
    lens = torch.tensor([5, 0, 1, 17, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [S+1]
    x = torch.randn(int(cu[-1]), dtype=torch.float64, requires_grad=True)  # [N]
    z = F.eligibility_trace_varlen(x, cu, s, backend=backend)
    Tm = int(lens.max())
    m = torch.arange(Tm)[None] < lens[:, None]  # [S, Tm]
    xp = torch.zeros(len(lens), Tm, dtype=torch.float64)
    xp[m] = x.detach()
    want = F.eligibility_trace(xp, m, s, backend=backend)[m]
    torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: F.eligibility_trace_varlen(v, cu.int(), s, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(backend, dtype):
    s = DecayStyle("recent", lam=0.999)
    x = torch.randn(3, 3000).to(dtype)
    m = torch.rand(3, 3000) < 0.9
    z = F.eligibility_trace(x, m, s, backend=backend)
    assert z.dtype == dtype
    want = F.eligibility_trace(x.float(), m, s, backend=backend).to(dtype)  # fp32 accumulation, rounded once
    torch.testing.assert_close(z, want, rtol=0, atol=0)
    x.requires_grad_(True)
    F.eligibility_trace(x, m, s, backend=backend).sum().backward()
    assert x.grad.dtype == dtype


def test_batch_dims_and_backends_agree():
    s = DecayStyle("both", lam=0.97, eps=0.01)
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    m = torch.rand(2, 3, 50) < 0.7
    outs = [F.eligibility_trace(x, m, s, backend=b) for b in BACKENDS + ["reference"]]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=1e-12)
    assert outs[0].shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences_are_sound_in_float32(backend):
    """T = 2^18 in float32 at gamma*lam in {0.999, 1}: finite, and close to the float64 result."""
    T = 1 << 18
    for style, d, eps in [("recent", 0.999, 0.0), ("recent", 1.0, 0.0), ("both", 0.999, 0.0), ("recent", 0.999, 0.01)]:
        s = DecayStyle(style, gamma=1.0, lam=d, eps=eps)
        x = torch.randn(1, T)
        z = F.eligibility_trace(x, None, s, backend=backend)
        z64 = F.eligibility_trace(x.double(), None, s, backend=backend)
        assert torch.isfinite(z).all()
        err = ((z.double() - z64).abs().max() / z64.abs().max()).item()
        assert err < 1e-4, (style, d, eps, err)


def test_two_to_the_twenty_tokens_in_bounded_memory():
    """A T = 2^20 row in a fresh process: forward + backward, peak RSS far below a dense T x T."""
    code = textwrap.dedent("""
        import resource, torch
        from creditlib import DecayStyle, functional as F
        torch.set_num_threads(1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        T = 1 << 20
        x = torch.randn(1, T, requires_grad=True)
        m = torch.rand(1, T) < 0.95
        for style in ("recent", "both"):
            z = F.eligibility_trace(x, m, DecayStyle(style, lam=0.999, eps=0.001), backend="torch")
            z.sum().backward()
            assert torch.isfinite(z).all() and torch.isfinite(x.grad).all()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    grew_mb = float(out.stdout.strip().splitlines()[-1])
    assert grew_mb < 1024, f"peak RSS grew by {grew_mb:.0f} MB (a dense 2^20 x 2^20 float32 is 4 TB)"


# ----------------------------------------------------------------------------- group advantage
def test_group_advantage_definitions():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = F.group_advantage(r, 3)
    g1 = r[:3]
    torch.testing.assert_close(a[:3], (g1 - g1.mean()) / (g1.std() + 1e-4))
    assert torch.equal(a[3:], torch.zeros(3, dtype=torch.float64))  # identical rewards -> 0
    a = F.group_advantage(r, 3, scale="none")
    torch.testing.assert_close(a[:3], g1 - g1.mean())
    a = F.group_advantage(r, 3, scale="none", baseline="loo")
    torch.testing.assert_close(a[:3], torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64))


def test_group_advantage_never_nan():
    r = torch.tensor([0.3, 0.7, 0.7])
    for scale, base in itertools.product(["std", "none"], ["mean", "loo"]):
        assert torch.equal(F.group_advantage(r, 1, scale=scale, baseline=base), torch.zeros(3))
        a = F.group_advantage(torch.ones(4), 2, scale=scale, baseline=base, eps=0.0)
        assert torch.equal(a, torch.zeros(4))


def test_group_ids_equal_contiguous_groups():
    r = torch.rand(12)
    perm = torch.randperm(12)
    gid = torch.arange(12) // 4
    a = F.group_advantage(r[perm], group_ids=gid[perm])
    torch.testing.assert_close(a, F.group_advantage(r, 4)[perm])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,word", [
    (dict(gamma=1.5), "gamma"), (dict(lam=-0.1), "lam"), (dict(eps=2.0), "eps"),
    (dict(lam=math.nan), "lam"), (dict(style="forward"), "style"),
])
def test_bad_style_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        DecayStyle(**kw)


def test_bad_inputs_name_the_argument():
    s = DecayStyle()
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="mask"):
        F.eligibility_trace(x, torch.ones(2, 5), s)  # float mask
    with pytest.raises(ValueError, match="mask"):
        F.eligibility_trace(x, torch.ones(2, 4, dtype=torch.bool), s)
    with pytest.raises(ValueError, match="x"):
        F.eligibility_trace(torch.ones(2, 5, dtype=torch.long), None, s)
    with pytest.raises(ValueError, match="style"):
        F.eligibility_trace(x, None, "recent")
    with pytest.raises(ValueError, match="backend"):
        F.eligibility_trace(x, None, s, backend="cuda-magic")
    with pytest.raises(ValueError, match="cu_seqlens"):
        F.eligibility_trace_varlen(torch.randn(5), torch.tensor([0, 2, 4]), s)
    with pytest.raises(ValueError, match="group_size"):
        F.group_advantage(torch.randn(6), 4)
    with pytest.raises(ValueError, match="rewards"):
        F.group_advantage(torch.randn(2, 3), 3)
    with pytest.raises(ValueError, match="scale"):
        F.group_advantage(torch.randn(6), 3, scale="max")
    with pytest.raises(ValueError, match="T"):
        F.trace_weights(-1, s)


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_equals_eager_without_graph_breaks():
    """The trace is one opaque custom op: a user's loss compiles with fullgraph=True around it."""
    s = DecayStyle("both", lam=0.9, eps=0.05)

    def loss(logp, old, m, adv):
        z = F.eligibility_trace(logp - old, m, s)  # [B, T]
        return -(torch.exp(z) * adv[:, None] * m).sum() / m.sum()

    B, T = 4, 50
    old = torch.randn(B, T)
    m = torch.rand(B, T) < 0.8
    adv = torch.randn(B)
    lp1 = (old + 0.1 * torch.randn(B, T)).requires_grad_(True)
    lp2 = lp1.detach().clone().requires_grad_(True)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    l1 = compiled(lp1, old, m, adv)
    l1.backward()
    l2 = loss(lp2, old, m, adv)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(lp1.grad, lp2.grad)
