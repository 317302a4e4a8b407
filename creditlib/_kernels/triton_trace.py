"""Triton kernel of the trace scan ``z = W x`` / ``z = W^T x`` (CUDA; CPU under the interpreter).

Calling convention: see :mod:`creditlib._kernels` (``trace_scan(x, mask_u8, cu_seqlens, d, eps,
both, transpose)``).

Algorithm (one program per row / packed sequence, looping over blocks of ``BLOCK`` positions):

With ``k`` the valid-token index of a position, ``L`` the floor window (``DecayStyle.window``) and
the windows ``a_k`` (start of the decayed window) and ``b_k`` (end of the early part)

* ``recent``: ``a_k = 0`` (``max(0, k - L)`` with a floor), ``b_k = -1``;
* ``both``:   ``a_k = k//2 + 1`` (``max(k//2 + 1, k - L)``), ``b_k = k//2`` (``min(k//2, L)``),

the trace is ``z_k = r_k - d^(k-a_k+1) r_(a_k-1) + Q_(b_k) + eps (P_(a_k-1) - P_(b_k))`` where

* ``r_k = sum_(j<=k) d^(k-j) x_j``: the recent trace, an associative scan of the linear
  recurrence ``h = a h + x`` (``a = d`` on valid tokens, ``1`` on masked ones) inside a block,
  carried across blocks in a register;
* ``P_k = sum_(j<=k) x_j`` and ``Q_k = sum_(j<=k) d^j x_j``: prefix sums;
* index ``-1`` means 0.

The block writes ``r, P, Q`` to a scratch buffer indexed by valid-token index (compacted), then
after a block barrier gathers them at ``a_k - 1`` and ``b_k`` (always ``<= k``: written by this or
an earlier block of the same program). ``recent`` without a floor needs no scratch.

The transpose (forward-view credit ``C_j = sum_(t>=j) w(t, j) a_t``) is the same pass run from the
end of the row: for fixed ``j`` the decayed window is ``t in [j, A_j]`` with
``A_j = j + L`` (recent) or ``min(2j - 1, j + L)`` (both), the early part is ``t >= B_j`` with
weight ``d^j`` (``B_j = 2j``, only when ``j <= L`` under a floor), the middle ``eps``. So
``C_j = s_j - d^(A_j-j+1) s_(A_j+1) + d^j S_(B_j) + eps (S_(A_j+1) - S_(B_j))`` with ``s`` the
reverse recent trace and ``S`` the suffix sum (index ``>= n`` means 0).

Accuracy: float32 and float64 inputs accumulate in float64 (``d`` rounded to float32 loses
10-40x accuracy at ``d = 0.999``; float64 keeps the float32 result within a rounding of the exact
one); float16/bfloat16 accumulate in float32. Powers of ``d`` are computed in float64 by binary
exponentiation (no ``d^(-t)`` rescaling, which overflows). Masked inputs are never read (masked
loads) so NaN/inf there cannot leak; masked outputs are written as exact zeros.

Rows up to ``2^30`` tokens.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:  # triton is optional: without it this backend reports unavailable
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAVE_TRITON = False

# The interpreter is chosen when the kernels are decorated (at import of this module), so the
# environment variable must be set before this module is first imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MAX_BLOCK = 1024


def available() -> bool:
    """True when the kernel can run: triton importable and a CUDA device present, or the
    Triton interpreter was active (``TRITON_INTERPRET=1``) when this module was imported (then it
    runs on CPU tensors, slowly: tests only)."""
    if not _HAVE_TRITON:
        return False
    if _INTERPRET:
        return True
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if _HAVE_TRITON:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _pow(base, e, NBITS: tl.constexpr):
        """``base ** e`` elementwise in float64 for int32 ``e`` in ``[0, 2**NBITS)`` (``0**0 = 1``)."""
        res = tl.zeros(e.shape, tl.float64) + 1.0
        b = base
        for i in tl.static_range(NBITS):
            res = tl.where(((e >> i) & 1) != 0, res * b, res)
            b = b * b
        return res

    @triton.jit
    def _row_bounds(cu_ptr, row, T, VARLEN: tl.constexpr):
        if VARLEN:
            start = tl.load(cu_ptr + row)
            length = (tl.load(cu_ptr + row + 1) - start).to(tl.int32)
        else:
            start = row.to(tl.int64) * T
            length = T + 0 * row  # a tensor even when T == 1 arrives as a constexpr
        return start, length

    @triton.jit
    def _trace_fwd_kernel(x_ptr, m_ptr, cu_ptr, out_ptr, r_ptr, p_ptr, q_ptr, par_ptr, L, T,
                          HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BOTH: tl.constexpr,
                          FLOOR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                          NBITS: tl.constexpr):
        row = tl.program_id(0)
        start, length = _row_bounds(cu_ptr, row, T, VARLEN)
        d64 = tl.load(par_ptr)
        eps = tl.load(par_ptr + 1).to(ACC)
        c_floor = tl.load(par_ptr + 2).to(ACC)  # d^(L+1)
        d = d64.to(ACC)
        ar = tl.arange(0, BLOCK)
        r_carry = tl.sum(tl.zeros([BLOCK], ACC), 0)
        p_carry = tl.sum(tl.zeros([BLOCK], ACC), 0)
        q_carry = tl.sum(tl.zeros([BLOCK], ACC), 0)
        kbase = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for blk in range(0, length, BLOCK):
            offs = blk + ar  # [BLOCK] positions in the row
            inb = offs < length
            if HAS_MASK:
                mv = tl.load(m_ptr + start + offs, mask=inb, other=0)
                valid = inb & (mv != 0)
            else:
                valid = inb
            x = tl.load(x_ptr + start + offs, mask=valid, other=0.0).to(ACC)  # masked: never read
            vi = valid.to(tl.int32)
            k = kbase + tl.cumsum(vi, 0) - 1  # valid-token index (-1 before the first)
            kk = tl.maximum(k, 0)
            one = tl.zeros([BLOCK], ACC) + 1.0
            a = tl.where(valid, one * d, one)
            A, H = tl.associative_scan((a, x), 0, _combine)
            r = H + A * r_carry  # recent trace r_k
            r_carry = tl.sum(tl.where(ar == BLOCK - 1, r, 0.0), 0)
            kbase += tl.sum(vi, 0)
            if BOTH or FLOOR:
                tl.store(r_ptr + start + kk, r, mask=valid)
                if FLOOR:
                    P = tl.cumsum(x, 0) + p_carry
                    p_carry = tl.sum(tl.where(ar == BLOCK - 1, P, 0.0), 0)
                    tl.store(p_ptr + start + kk, P, mask=valid)
                if BOTH:
                    wq = _pow(d64, kk, NBITS).to(ACC)
                    Q = tl.cumsum(tl.where(valid, wq * x, 0.0), 0) + q_carry
                    q_carry = tl.sum(tl.where(ar == BLOCK - 1, Q, 0.0), 0)
                    tl.store(q_ptr + start + kk, Q, mask=valid)
                tl.debug_barrier()  # the gathers below read what this block just wrote
                if BOTH:
                    half = kk >> 1
                    if FLOOR:
                        ia = tl.maximum(half, kk - L - 1)  # a_k - 1 >= 0
                        ib = tl.minimum(half, L)  # b_k >= 0
                    else:
                        ia = half
                        ib = half
                    c = _pow(d64, kk - ia, NBITS).to(ACC)  # d^(k - a_k + 1)
                    ra = tl.load(r_ptr + start + ia, mask=valid, other=0.0)
                    qb = tl.load(q_ptr + start + ib, mask=valid, other=0.0)
                    z = r - c * ra + qb
                    if FLOOR:
                        pa = tl.load(p_ptr + start + ia, mask=valid, other=0.0)
                        pb = tl.load(p_ptr + start + ib, mask=valid, other=0.0)
                        z = z + eps * (pa - pb)
                else:  # recent with a floor: a_k - 1 = k - L - 1, b_k = -1
                    ia = kk - L - 1
                    has = valid & (ia >= 0)
                    ia = tl.maximum(ia, 0)
                    ra = tl.load(r_ptr + start + ia, mask=has, other=0.0)
                    pa = tl.load(p_ptr + start + ia, mask=has, other=0.0)
                    z = r - c_floor * ra + eps * pa
            else:
                z = r
            z = tl.where(valid, z, 0.0)
            tl.store(out_ptr + start + offs, z.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _trace_bwd_kernel(x_ptr, m_ptr, cu_ptr, out_ptr, s_ptr, S_ptr, par_ptr, L, T,
                          HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BOTH: tl.constexpr,
                          FLOOR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                          NBITS: tl.constexpr):
        """``W^T x``: the same pass from the end of the row."""
        row = tl.program_id(0)
        start, length = _row_bounds(cu_ptr, row, T, VARLEN)
        d64 = tl.load(par_ptr)
        eps = tl.load(par_ptr + 1).to(ACC)
        c_floor = tl.load(par_ptr + 2).to(ACC)  # d^(L+1)
        d = d64.to(ACC)
        ar = tl.arange(0, BLOCK)
        # n = number of valid tokens of the row (to count valid indices from the start)
        if HAS_MASK:
            n = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
            for blk in range(0, length, BLOCK):
                offs = blk + ar
                inb = offs < length
                mv = tl.load(m_ptr + start + offs, mask=inb, other=0)
                n += tl.sum((inb & (mv != 0)).to(tl.int32), 0)
        else:
            n = length
        s_carry = tl.sum(tl.zeros([BLOCK], ACC), 0)
        S_carry = tl.sum(tl.zeros([BLOCK], ACC), 0)
        cbase = tl.sum(tl.zeros([BLOCK], tl.int32), 0)  # valid tokens after the current block
        nblk = tl.cdiv(length, BLOCK)
        for i in range(0, nblk):
            offs = (nblk - 1 - i) * BLOCK + (BLOCK - 1) - ar  # descending positions
            inb = offs < length
            if HAS_MASK:
                mv = tl.load(m_ptr + start + offs, mask=inb, other=0)
                valid = inb & (mv != 0)
            else:
                valid = inb
            x = tl.load(x_ptr + start + offs, mask=valid, other=0.0).to(ACC)
            vi = valid.to(tl.int32)
            k = n - (cbase + tl.cumsum(vi, 0))  # valid-token index (n when none after)
            kk = tl.minimum(tl.maximum(k, 0), tl.maximum(n - 1, 0))
            one = tl.zeros([BLOCK], ACC) + 1.0
            a = tl.where(valid, one * d, one)
            A, H = tl.associative_scan((a, x), 0, _combine)
            s = H + A * s_carry  # reverse recent trace s_j
            s_carry = tl.sum(tl.where(ar == BLOCK - 1, s, 0.0), 0)
            cbase += tl.sum(vi, 0)
            if BOTH or FLOOR:
                S = tl.cumsum(x, 0) + S_carry  # suffix sum S_j
                S_carry = tl.sum(tl.where(ar == BLOCK - 1, S, 0.0), 0)
                tl.store(s_ptr + start + kk, s, mask=valid)
                tl.store(S_ptr + start + kk, S, mask=valid)
                tl.debug_barrier()  # the gathers below read what this block just wrote
                if BOTH:
                    ej = _pow(d64, kk, NBITS).to(ACC)  # d^j: early weight (and window decay)
                    ib = 2 * kk  # B_j
                    if FLOOR:
                        ia = tl.minimum(2 * kk, kk + L + 1)  # A_j + 1
                        c = _pow(d64, tl.minimum(kk, L + 1), NBITS).to(ACC)  # d^(A_j - j + 1)
                        ib = tl.where(kk <= L, ib, n)  # no early part beyond L
                    else:
                        ia = ib
                        c = ej
                    ha = valid & (ia < n)
                    hb = valid & (ib < n)
                    sa = tl.load(s_ptr + start + ia, mask=ha, other=0.0)
                    Sb = tl.load(S_ptr + start + ib, mask=hb, other=0.0)
                    z = s - c * sa + ej * Sb
                    if FLOOR:
                        Sa = tl.load(S_ptr + start + ia, mask=ha, other=0.0)
                        z = z + eps * (Sa - Sb)
                else:  # recent with a floor: A_j + 1 = j + L + 1, no early part
                    ia = kk + L + 1
                    ha = valid & (ia < n)
                    sa = tl.load(s_ptr + start + ia, mask=ha, other=0.0)
                    Sa = tl.load(S_ptr + start + ia, mask=ha, other=0.0)
                    z = s - c_floor * sa + eps * Sa
            else:
                z = s
            z = tl.where(valid, z, 0.0)
            tl.store(out_ptr + start + offs, z.to(out_ptr.dtype.element_ty), mask=inb)


def _window(d: float, eps: float) -> Optional[int]:
    from ..style import DecayStyle

    return DecayStyle("recent", gamma=1.0, lam=d, eps=eps).window


@functools.lru_cache(maxsize=64)
def _params(d: float, eps: float, c_floor: float, device: torch.device) -> torch.Tensor:
    # float64 on the device (Triton passes Python floats as float32); cached: no copy per call
    return torch.tensor([d, eps, c_floor], dtype=torch.float64, device=device)  # [3]


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               d: float, eps: float, both: bool, transpose: bool, *, block: Optional[int] = None) -> torch.Tensor:
    """The trace (or its transpose) by the Triton kernel; see :mod:`creditlib._kernels`.

    ``block`` (tests only) overrides the block size (a power of two >= 16) to exercise the carry
    across blocks on short rows.
    """
    if not available():
        raise RuntimeError("the Triton trace kernel needs triton and a CUDA device "
                           "(or TRITON_INTERPRET=1 set before creditlib is imported)")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not (x.is_cuda or _INTERPRET):
        raise ValueError(f"x must be a CUDA tensor for the triton backend, got device {x.device}")
    d, eps = float(d), float(eps)
    if not (0.0 <= d <= 1.0) or not (0.0 <= eps <= 1.0):
        raise ValueError(f"d and eps must be in [0, 1], got d={d!r}, eps={eps!r}")
    x = x.contiguous()
    if cu_seqlens is not None:
        if x.dim() != 1:
            raise ValueError(f"x must be packed [N] with cu_seqlens, got shape {tuple(x.shape)}")
        if mask_u8 is not None:
            raise ValueError("mask_u8 must be None with cu_seqlens (packed sequences are all valid)")
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()  # [S+1]
        n_prog, T, max_len, varlen = cu.numel() - 1, 0, x.numel(), True
        m = x  # unused pointer
    else:
        if x.dim() != 2:
            raise ValueError(f"x must be padded [R, T] without cu_seqlens, got shape {tuple(x.shape)}")
        R, T = x.shape
        if mask_u8 is not None:
            if mask_u8.shape != x.shape:
                raise ValueError(f"mask_u8 shape {tuple(mask_u8.shape)} must equal x shape {tuple(x.shape)}")
            m = mask_u8.contiguous()
            if m.dtype == torch.bool:
                m = m.view(torch.uint8)
        else:
            m = x  # unused pointer
        cu = x  # unused pointer
        n_prog, max_len, varlen = R, T, False
    out = torch.empty_like(x)  # [R, T] or [N]
    if x.numel() == 0 or n_prog == 0:
        return out.zero_()
    if varlen and max_len >= (1 << 30):  # bound by the longest sequence instead (one sync)
        max_len = int((cu[1:] - cu[:-1]).max())
    if max_len >= (1 << 30):
        raise ValueError(f"sequences of 2^30 tokens or more are not supported by the triton backend, got {max_len}")

    L = _window(d, eps)
    floor = L is not None and L < max_len  # the floor binds somewhere in this tensor
    L = int(L) if floor else 0
    c_floor = d ** (L + 1) if floor else 0.0  # Python float64
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    par = _params(d, eps, c_floor, x.device)  # [3] float64: d, eps, d^(L+1)
    if block is None:
        block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max_len)))
    nbits = 5 * max(2, -(-int(max_len).bit_length() // 5))  # exponents < 2^nbits; few distinct compiles
    flat = x.reshape(-1)
    need = both or floor
    if transpose:
        s_buf = torch.empty(flat.numel() if need else 1, dtype=acc, device=x.device)  # [R*T] or [N]
        S_buf = torch.empty(flat.numel() if need else 1, dtype=acc, device=x.device)
        _trace_bwd_kernel[(n_prog,)](
            x, m, cu, out, s_buf, S_buf, par, L, T,
            HAS_MASK=(not varlen and mask_u8 is not None), VARLEN=varlen, BOTH=bool(both), FLOOR=floor,
            ACC=tl_acc, BLOCK=block, NBITS=nbits, num_warps=8 if block >= 1024 else 4, num_stages=1)
    else:
        r_buf = torch.empty(flat.numel() if need else 1, dtype=acc, device=x.device)
        p_buf = torch.empty(flat.numel() if floor else 1, dtype=acc, device=x.device)
        q_buf = torch.empty(flat.numel() if both else 1, dtype=acc, device=x.device)
        _trace_fwd_kernel[(n_prog,)](
            x, m, cu, out, r_buf, p_buf, q_buf, par, L, T,
            HAS_MASK=(not varlen and mask_u8 is not None), VARLEN=varlen, BOTH=bool(both), FLOOR=floor,
            ACC=tl_acc, BLOCK=block, NBITS=nbits, num_warps=8 if block >= 1024 else 4, num_stages=1)
    return out
