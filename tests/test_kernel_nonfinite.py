"""-inf / +inf / NaN at valid tokens: one defined pattern on every backend.

The rule (``creditlib.ops.trace``): a non-finite valid input reaches exactly the outputs whose weight
includes it (``trace_support``: ``w(t, j) > 0`` as a real number, also where it underflows). An
output reached only by ``-inf`` inputs is ``-inf``, only by ``+inf`` inputs ``+inf``, by a NaN or
by both signs NaN; every other valid output is the finite trace of the finite inputs; masked
outputs are 0. Before this rule the dense reference gave -inf, the torch backend NaN and the C++
kernel -inf then NaN for the same input.

The expected pattern here is computed from ``trace_support`` directly (not from any backend), and
the finite values from the dense reference applied to the input with its non-finite values zeroed.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.trace import Schedule, trace_scan
from creditlib.ops.trace.naive import trace_support

from .conftest import available_backends

BACKENDS = available_backends() + ["reference"]
STYLES = [DecayStyle(k, gamma=1.0, lam=d, eps=e, normalize=n)
          for k, d, e, n in itertools.product(("recent", "both"), (0.0, 0.9), (0.0, 0.1), (False, True))]
STYLES.append(DecayStyle("sequence"))
INF = float("inf")


def _masks(R, T, gen):
    """bool [R, T] masks of each kind: none, right-padded, left-padded, scattered."""
    lens = torch.randint(T // 2, T + 1, (R,), generator=gen)  # [R]
    ar = torch.arange(T)  # [T]
    right = ar[None, :] < lens[:, None]  # [R, T]
    left = ar[None, :] >= (T - lens)[:, None]  # [R, T]
    scattered = torch.rand(R, T, generator=gen) < 0.7  # [R, T]
    return {"none": None, "right": right, "left": left, "scattered": scattered}


def _poison(x, mask, gen):
    """x with -inf (most rows), +inf, both signs and NaN at a few valid tokens, and NaN/inf in the
    padding; rows 0 and 1 keep finite valid inputs."""
    x = x.clone()
    R, T = x.shape
    valid = torch.ones(R, T, dtype=torch.bool) if mask is None else mask
    for r in range(2, R):
        idx = valid[r].nonzero()[:, 0]  # [n] array positions of the valid tokens
        if idx.numel() == 0:
            continue
        pick = idx[torch.randint(0, idx.numel(), (3,), generator=gen)]  # [3]
        kind = r % 6
        if kind in (0, 1, 2):
            x[r, pick[0]] = -INF  # one -inf: the case of the red-team finding
            if kind == 1:
                x[r, pick[1]] = -INF
        elif kind == 3:
            x[r, pick[0]] = INF
        elif kind == 4:
            x[r, pick[0]], x[r, pick[1]] = -INF, INF
        else:
            x[r, pick[0]], x[r, pick[1]] = -INF, float("nan")
    if mask is not None:  # masked inputs are never read
        fill = torch.tensor([float("nan"), INF, -INF], dtype=x.dtype)[torch.arange(x.numel()) % 3].view(R, T)
        x = torch.where(mask, x, fill)
    return x


def _expected(x, mask, style, transpose):
    """(pos, neg, nan) bool [R, T] each: the outputs reached by +inf, -inf and NaN inputs."""
    R, T = x.shape
    valid = torch.ones(R, T, dtype=torch.bool) if mask is None else mask
    reach = [torch.zeros(R, T, dtype=torch.bool) for _ in range(3)]
    for r in range(R):
        idx = valid[r].nonzero()[:, 0]  # [n]
        S = trace_support(len(idx), style)  # [n, n]
        if transpose:
            S = S.T
        xr = x[r, idx]  # [n]
        for k, sel in enumerate((xr == INF, xr == -INF, torch.isnan(xr))):
            reach[k][r, idx] = (S & sel[None, :]).any(-1)
    return reach


def _check(z, x, mask, style, transpose, tol):
    pos, neg, nan = _expected(x, mask, style, transpose)
    nan = nan | (pos & neg)
    pos, neg = pos & ~nan, neg & ~nan
    assert torch.equal(torch.isnan(z), nan), "NaN outputs differ from the rule"
    assert torch.equal(torch.isposinf(z), pos), "+inf outputs differ from the rule"
    assert torch.equal(torch.isneginf(z), neg), "-inf outputs differ from the rule"
    fin = ~(pos | neg | nan)  # [R, T]
    valid = torch.ones_like(fin) if mask is None else mask
    xf = torch.where(torch.isfinite(x) & valid, x, torch.zeros((), dtype=x.dtype)).double()  # [R, T]
    m = None if mask is None else mask.view(torch.uint8)
    ref = trace_scan(xf, m, None, Schedule.of(style), transpose, "reference")  # [R, T] float64
    assert torch.allclose(z.double()[fin], ref[fin], rtol=tol, atol=tol)
    if mask is not None:
        assert bool((z[~mask] == 0).all()), "masked outputs must be 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES, ids=str)
def test_every_backend_gives_the_defined_pattern(backend, style):
    gen = torch.Generator().manual_seed(1)
    R, T = 20, 45  # 20 rows: a full 16-row block of the C++ kernel and a partial one
    x = torch.randn(R, T, generator=gen, dtype=torch.float64)  # [R, T]
    dtypes = (torch.float64,) if backend == "reference" else (torch.float64, torch.float32)
    for (mk, mask), dtype, transpose in itertools.product(_masks(R, T, gen).items(), dtypes, (False, True)):
        xp = _poison(x, mask, gen).to(dtype)  # [R, T]
        m = None if mask is None else mask.view(torch.uint8)
        z = trace_scan(xp, m, None, Schedule.of(style), transpose, backend)  # [R, T]
        assert z.dtype == dtype
        _check(z, xp, mask, style, transpose, 1e-9 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", [DecayStyle("recent", lam=0.99), DecayStyle("both", lam=0.9, eps=0.05),
                                   DecayStyle("recent", lam=0.9, normalize=True), DecayStyle("sequence")], ids=str)
def test_varlen_segments(backend, style):
    gen = torch.Generator().manual_seed(2)
    lens = [5, 0, 30, 1, 17, 40]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)))  # [S+1]
    x = torch.randn(int(cu[-1]), generator=gen, dtype=torch.float64)  # [N]
    x[7] = -INF  # segment 2
    x[36] = INF  # segment 3 (length 1)
    x[40], x[45] = -INF, INF  # segment 4: both signs
    x[60] = -INF  # segment 5
    for transpose in (False, True):
        zv = trace_scan(x.float(), None, cu, Schedule.of(style), transpose, backend)  # [N]
        for s in range(len(lens)):  # each segment as a one-row padded input
            seg = x[cu[s]:cu[s + 1]][None, :]  # [1, n]
            _check(zv[cu[s]:cu[s + 1]][None, :], seg, None, style, transpose, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_where_weights_underflow(backend):
    """d = 0.6 over 3000 tokens: d^lag underflows (even in float64) long before the row ends, yet a
    -inf still reaches every later token, as -inf, and the tokens before it stay finite."""
    if backend == "reference":
        pytest.skip("the dense reference at T = 3000 is covered by the short cases")
    gen = torch.Generator().manual_seed(3)
    R, T = 17, 3000
    x = torch.randn(R, T, generator=gen)  # [R, T] float32
    x[3, 100] = -INF
    x[16, 2999] = -INF
    x[5, 10], x[5, 2000] = INF, -INF
    mask = torch.ones(R, T, dtype=torch.bool)
    mask[3, 2500:] = False  # right padding after the -inf
    for style in (DecayStyle("recent", lam=0.6), DecayStyle("both", lam=0.6), DecayStyle("recent", lam=0.6, eps=0.01)):
        for transpose in (False, True):
            z = trace_scan(x, mask.view(torch.uint8), None, Schedule.of(style), transpose, backend)  # [R, T]
            if not transpose:
                assert bool(torch.isneginf(z[3, 100:2500]).all()) and bool(torch.isfinite(z[3, :100]).all())
                assert bool((z[3, 2500:] == 0).all())
                assert bool(torch.isposinf(z[5, 10:2000]).all()) and bool(torch.isnan(z[5, 2000:]).all())
            else:
                assert bool(torch.isneginf(z[3, :101]).all()) and bool(torch.isfinite(z[3, 101:2500]).all())
                assert bool(torch.isneginf(z[16]).all())
            ok_rows = [r for r in range(R) if r not in (3, 5, 16)]
            assert bool(torch.isfinite(z[ok_rows]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(backend, dtype):
    x = torch.randn(3, 20).to(dtype)  # [3, 20]
    x[1, 4] = -INF
    x[2, 0], x[2, 9] = INF, -INF
    z = trace_scan(x, None, None, Schedule.of(DecayStyle("recent", lam=0.9)), False, backend)  # [3, 20]
    _check(z, x, None, DecayStyle("recent", lam=0.9), False, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_api_value_and_finite_gradient(backend):
    """Through ``F.eligibility_trace``: -inf at one valid token gives -inf from there on (never NaN),
    and the gradient stays finite for a finite upstream gradient (it does not depend on x)."""
    style = DecayStyle("recent", lam=0.95)
    x = torch.randn(4, 30, dtype=torch.float64)  # [4, 30]
    x[1, 12] = -INF
    x = x.requires_grad_(True)
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[1, 25:] = False
    z = F.eligibility_trace(x, mask, style, backend=backend)  # [4, 30]
    assert bool(torch.isneginf(z[1, 12:25]).all()) and bool((z[1, 25:] == 0).all())
    assert not bool(torch.isnan(z).any())
    g = torch.randn(4, 30, dtype=torch.float64)  # [4, 30] finite upstream gradient
    (gx,) = torch.autograd.grad(z, x, g)
    assert bool(torch.isfinite(gx).all())
    xf = x.detach().clone().requires_grad_(True)
    xf.data[1, 12] = 0.0
    (gf,) = torch.autograd.grad(F.eligibility_trace(xf, mask, style, backend=backend), xf, g)
    assert torch.allclose(gx, gf)  # the gradient of a linear map does not see the input


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
def test_cpp_flags_only_rows_with_nonfinite_inputs(backend):
    """The C++ kernel reports a non-finite carry only when one happened (the fast path's check),
    including NaN/inf that sits only in the padding (never read: no flag)."""
    from creditlib.ops.trace import cpu

    mod = cpu.load()
    sched = Schedule.of(DecayStyle("recent", lam=0.999))
    x = torch.randn(40, 300)  # [40, 300]
    mask = torch.ones(40, 300, dtype=torch.bool)
    mask[:, 250:] = False
    x[:, 260] = float("nan")  # padding only
    for transpose in (False, True):
        for s in (sched, Schedule.of(DecayStyle("both", lam=0.9, eps=0.1)), Schedule.of(DecayStyle("sequence"))):
            _, flag = cpu._raw_scan(mod, x, mask.view(torch.uint8), None, s, transpose)
            assert flag is False
            xb = x.clone()
            xb[33, 7] = -INF
            _, flag = cpu._raw_scan(mod, xb, mask.view(torch.uint8), None, s, transpose)
            assert flag is True


# ----------------------------------------------------------------------------- Triton (interpreter)
_TRITON_WORKER = r"""
import itertools, json, sys, torch
sys.path.insert(0, sys.argv[1])
import tests.test_kernel_nonfinite as t
from creditlib import DecayStyle
from creditlib.ops.trace import Schedule, triton_kernel
gen = torch.Generator().manual_seed(4)
R, T = 6, 33
x = torch.randn(R, T, generator=gen, dtype=torch.float64)
fails = []
styles = [DecayStyle("recent", lam=0.9), DecayStyle("recent", lam=0.9, normalize=True),
          DecayStyle("both", lam=0.8, eps=0.1), DecayStyle("recent", lam=0.0, eps=0.2), DecayStyle("sequence")]
for style, (mk, mask), tr in itertools.product(styles, t._masks(R, T, gen).items(), (False, True)):
    xp = t._poison(x, mask, gen).float()
    m = None if mask is None else mask.view(torch.uint8)
    try:
        z = triton_kernel.trace_scan(xp, m, None, Schedule.of(style), tr, block=8, rows=2)
        t._check(z, xp, mask, style, tr, 2e-5)
    except AssertionError as e:
        fails.append(f"{style} {mk} transpose={tr}: {e}")
cu = torch.tensor([0, 5, 20, 21, 40])
xv = torch.randn(40, dtype=torch.float64)
xv[7], xv[20], xv[25], xv[30] = -INF, INF, -INF, INF
for tr in (False, True):
    z = triton_kernel.trace_scan(xv.float(), None, cu, Schedule.of(styles[0]), tr, block=8)
    for s in range(4):
        try:
            t._check(z[cu[s]:cu[s + 1]][None], xv[cu[s]:cu[s + 1]][None], None, styles[0], tr, 2e-5)
        except AssertionError as e:
            fails.append(f"varlen segment {s} transpose={tr}: {e}")
print("RESULT " + json.dumps(fails))
""".replace("INF", "float('inf')")


@pytest.mark.slow
def test_triton_under_the_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _TRITON_WORKER, root], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    fails = json.loads(line[0][len("RESULT "):])
    assert not fails, "\n".join(fails[:10])
