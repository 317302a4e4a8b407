"""The Triton trace kernel held to the dense reference, under Triton's interpreter on CPU.

No GPU in CI: the kernels run under ``TRITON_INTERPRET=1``, which must be set before triton is
imported and would otherwise leak into the other tests. So every case runs in ONE subprocess
(``python tests/test_kernel_triton.py --worker``) that prints one JSON result per case; the tests
here are parametrized over the cases and read those results. Sizes are small (the interpreter
runs numpy op by op), with a small block size on some cases so that rows span several blocks and
the carry across blocks is exercised.

Covered: styles recent / both, eps in {0, 0.05, 0.8, 1} (floors that bind inside the row),
d in {0, 0.5, 0.99, 1}, forward and transpose, masks (all valid, left / right padding, several
runs, all-masked rows, a single valid token, random), NaN/inf at masked positions, T = 1, varlen
(empty and length-1 sequences), float64 / float32 (d = 0.999, T = 1024) / bfloat16 / float16,
autograd through the public API (gradient = transpose, NaN never reaching the gradient,
float64 gradcheck) and varlen == padded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STYLES = ("recent", "both")
DECAYS = (0.0, 0.5, 0.99, 1.0)


def _case_list():
    """Every case as a dict (JSON-able); ``name`` is unique."""
    cases = []
    for style in STYLES:
        for tr in (False, True):
            # eps = 0.8 binds inside T = 37 at every d < 1 (L = 0, 0, 22); 0.05 at d = 0.5 (L = 4)
            for d in DECAYS:
                for eps in (0.0, 0.8):
                    cases.append(dict(kind="masked", style=style, d=d, eps=eps, transpose=tr, block=16))
            for eps in (0.05, 1.0):
                cases.append(dict(kind="masked", style=style, d=0.5, eps=eps, transpose=tr, block=16))
            for d in (0.5, 0.99):
                for eps in (0.0, 0.8):
                    cases.append(dict(kind="nomask", style=style, d=d, eps=eps, transpose=tr, block=None))
            cases.append(dict(kind="t1", style=style, d=0.5, eps=0.05, transpose=tr, block=None))
            for eps in (0.0, 0.8):
                cases.append(dict(kind="varlen", style=style, d=0.99, eps=eps, transpose=tr, block=16))
            cases.append(dict(kind="float32", style=style, d=0.999, eps=0.5 if style == "both" else 0.0,
                              transpose=tr, block=256))
            for dt in ("bfloat16", "float16"):
                cases.append(dict(kind=dt, style=style, d=0.99, eps=0.8, transpose=tr, block=16))
        for eps in (0.0, 0.8):
            cases.append(dict(kind="autograd", style=style, d=0.99, eps=eps, transpose=False, block=None))
            cases.append(dict(kind="varlen_api", style=style, d=0.99, eps=eps, transpose=False, block=None))
    cases.append(dict(kind="gradcheck", style="both", d=0.5, eps=0.3, transpose=False, block=None))
    for c in cases:
        c["name"] = (f"{c['kind']}-{c['style']}-d{c['d']}-eps{c['eps']}-{'T' if c['transpose'] else 'F'}"
                     f"-b{c['block']}")
    assert len({c["name"] for c in cases}) == len(cases)
    return cases


CASES = _case_list()


# ----------------------------------------------------------------------------- worker side
def _mask_patterns(T, gen):
    """[7, T] bool: all valid, left pad, right pad, several runs, all masked, one token, random."""
    import torch

    m = torch.zeros(7, T, dtype=torch.bool)
    m[0] = True
    m[1, 10:] = True
    m[2, :30] = True
    for lo, hi in ((0, 6), (12, 21), (25, 31), (35, 37)):
        m[3, lo:hi] = True
    m[5, T // 2] = True
    m[6] = torch.rand(T, generator=gen) < 0.7
    return m


def _poison(x, mask):
    """NaN / +inf / -inf at the masked positions of ``x``."""
    import torch

    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    fill = bad[torch.arange(x.numel()) % 3].reshape(x.shape)
    return torch.where(mask, x, fill)


def _run_case(c):
    """Returns a dict with ``ok`` and the measured error."""
    import torch
    from creditlib import functional as F
    from creditlib._kernels import reference_scan, triton_trace
    from creditlib.style import DecayStyle

    assert triton_trace.available(), "the interpreter should make the triton backend available"
    gen = torch.Generator().manual_seed(zlib.crc32(c["name"].encode()))
    both, d, eps, tr, block = c["style"] == "both", c["d"], c["eps"], c["transpose"], c["block"]
    style = DecayStyle(c["style"], gamma=1.0, lam=d, eps=eps)
    kind = c["kind"]
    res = {}

    def close(z, ref, tol):
        z64, ref64 = z.double(), ref.double()
        scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
        err = float((z64 - ref64).abs().max()) / scale if ref64.numel() else 0.0
        res.update(err=err, tol=tol, dtype_ok=(z.dtype == ref.dtype or kind in ("bfloat16", "float16")))
        return err <= tol and bool(torch.isfinite(z).all())

    if kind in ("masked", "nomask", "t1", "float32", "bfloat16", "float16"):
        T = {"t1": 1, "float32": 1024}.get(kind, 37)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(kind, torch.float64)
        if kind == "t1":
            mask = torch.tensor([[True], [False], [True]])  # [3, 1]
        elif kind == "float32":
            mask = torch.rand(2, T, generator=gen) < 0.9  # [2, T]
            mask[0] = True
        else:
            mask = _mask_patterns(T, gen)  # [7, T]
        x = torch.randn(mask.shape, generator=gen, dtype=torch.float64).to(dtype)  # [R, T]
        if kind == "nomask":
            mask = torch.ones_like(mask)
            mu = None
        else:
            x = _poison(x, mask)
            mu = mask.view(torch.uint8)
        z = triton_trace.trace_scan(x, mu, None, d, eps, both, tr, block=block)
        ref = reference_scan(x.double(), mu, None, d, eps, both, tr)
        tol = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}.get(kind, 1e-11)
        ok = close(z, ref.to(dtype) if dtype != torch.float64 else ref, tol) and res["dtype_ok"]
        ok = ok and z.dtype == x.dtype and bool((z[~mask] == 0).all())
        if kind == "t1":  # T = 1 without a mask too
            xv = x[mask].reshape(-1, 1)  # [2, 1]
            ok = ok and close(triton_trace.trace_scan(xv, None, None, d, eps, both, tr), xv, 1e-15)
        return dict(res, ok=ok)

    if kind == "varlen":
        lens = [5, 0, 1, 37, 20, 0]
        cu = torch.tensor([0] + lens).cumsum(0)  # [S+1] int64
        x = torch.randn(int(cu[-1]), generator=gen, dtype=torch.float64)  # [N]
        z = triton_trace.trace_scan(x, None, cu, d, eps, both, tr, block=block)
        ref = reference_scan(x, None, cu, d, eps, both, tr)
        return dict(res, ok=close(z, ref, 1e-11) and z.shape == x.shape)

    if kind == "autograd":
        mask = _mask_patterns(37, gen)  # [7, 37]
        x = _poison(torch.randn(mask.shape, generator=gen, dtype=torch.float64), mask).requires_grad_(True)
        g = torch.randn(mask.shape, generator=gen, dtype=torch.float64)  # [7, 37]
        z = F.eligibility_trace(x, mask, style, backend="triton")
        (gx,) = torch.autograd.grad(z, x, g)
        mu = mask.view(torch.uint8)
        ok = close(z.detach(), reference_scan(x.detach(), mu, None, d, eps, both, False), 1e-11)
        gref = reference_scan(g, mu, None, d, eps, both, True)
        ok = ok and close(gx, gref, 1e-11)
        c_tr = F.traced_credit(g, mask, style, backend="triton")  # forward view = W^T g
        ok = ok and close(c_tr, gref, 1e-11) and bool((gx[~mask] == 0).all())
        return dict(res, ok=ok)

    if kind == "varlen_api":
        lens = [9, 1, 0, 23]
        cu = torch.tensor([0] + lens).cumsum(0)  # [S+1]
        x = torch.randn(int(cu[-1]), generator=gen, dtype=torch.float64)  # [N]
        zv = F.eligibility_trace_varlen(x, cu, style, backend="triton")
        from creditlib._kernels import varlen_to_padded
        xp, mp, _ = varlen_to_padded(x, cu)  # [S, Tmax]
        zp = F.eligibility_trace(xp, mp, style, backend="triton")  # [S, Tmax]
        return dict(res, ok=close(zv, zp[mp], 1e-12))

    if kind == "gradcheck":
        mask = torch.tensor([[True, False, True, True, True, True]])  # [1, 6]; L = 1 binds
        x = torch.randn(mask.shape, generator=gen, dtype=torch.float64, requires_grad=True)  # [1, 6]
        ok = torch.autograd.gradcheck(lambda v: F.eligibility_trace(v, mask, style, backend="triton"), (x,))
        return dict(res, ok=bool(ok))

    raise ValueError(f"unknown case kind {kind!r}")


def _worker():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the worker must run with TRITON_INTERPRET=1")
    for c in CASES:
        try:
            r = _run_case(c)
        except Exception as e:  # report the case, keep going
            r = dict(ok=False, error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(dict(r, name=c["name"])), flush=True)


# ----------------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[r["name"]] = r
    return out


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_triton_kernel_matches_reference(interpreter_results, name):
    assert name in interpreter_results, "the worker did not report this case"
    r = interpreter_results[name]
    assert r["ok"], r


def test_triton_unavailable_without_gpu_or_interpreter():
    """Outside the interpreter, the backend is available exactly when CUDA is, and refuses CPU tensors."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs under the Triton interpreter")
    import torch
    from creditlib._kernels import triton_trace

    assert triton_trace.available() == torch.cuda.is_available()
    with pytest.raises((RuntimeError, ValueError)):
        triton_trace.trace_scan(torch.zeros(2, 3), None, None, 0.5, 0.0, False, False)


@pytest.mark.parametrize("variant", [
    # (transpose, HAS_MASK, VARLEN, BOTH, FLOOR, x dtype)
    (False, True, False, True, True, "fp32"),
    (True, True, False, True, True, "fp32"),
    (False, False, True, False, True, "bf16"),
    (True, False, False, False, False, "fp64"),
], ids=["fwd-mask-both-floor-fp32", "bwd-mask-both-floor-fp32", "fwd-varlen-recent-floor-bf16",
        "bwd-nomask-recent-fp64"])
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_kernel_compiles_for_cuda(variant):
    """Ahead-of-time compile (Triton -> PTX -> cubin with the bundled ptxas) for sm_90: no GPU
    needed. Checks the GPU lowering (float64 tuple scan, barrier before the scratch gathers);
    running it on a GPU is not covered here."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs under the Triton interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - other triton versions
        pytest.skip(f"triton's AOT compile API is not available: {e}")
    import triton.language as tl

    from creditlib._kernels import triton_trace as tt

    transpose, has_mask, varlen, both, floor, xt = variant
    acc = "fp32" if xt == "bf16" else "fp64"
    scratch = ("s_ptr", "S_ptr") if transpose else ("r_ptr", "p_ptr", "q_ptr")
    kernel = tt._trace_bwd_kernel if transpose else tt._trace_fwd_kernel
    sig = {"x_ptr": f"*{xt}", "m_ptr": "*u8", "cu_ptr": "*i64", "out_ptr": f"*{xt}",
           **{n: f"*{acc}" for n in scratch}, "par_ptr": "*fp64", "L": "i32", "T": "i32"}
    consts = dict(HAS_MASK=has_mask, VARLEN=varlen, BOTH=both, FLOOR=floor,
                  ACC=tl.float32 if acc == "fp32" else tl.float64, BLOCK=1024, NBITS=15)
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 1})
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx and len(compiled.asm["cubin"]) > 0
    if both or floor:  # the scratch gathers must follow a CTA barrier
        assert "bar.sync" in ptx


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
