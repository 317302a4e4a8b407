"""Triton kernel of the trace scan ``z = W x`` / ``z = W^T x`` (CUDA; CPU under the interpreter).

Calling convention: see :mod:`creditlib.ops.trace` (``trace_scan(x, mask_u8, cu_seqlens, sched,
transpose)`` with a :class:`~creditlib.ops.trace.Schedule`).

Layout (chunked, in the style of flash-linear-attention's chunk kernels): each program owns ``BR``
rows (padded rows or packed sequences) and walks them together in chunks of ``C`` positions, a
``[BR, C]`` tile per step (coalesced loads along ``T``), passing one carry per row (``[BR]``) from
chunk to chunk. ``BR * C`` is about 4096 elements; ``BR`` shrinks when there are few rows so that
more programs run.

Recent trace inside a chunk (no scan of products, no float64). With ``n_t`` the number of valid
tokens of the chunk up to ``t`` (inclusive) and ``m = n - 1``::

    r_t = d^(m_t) * ( sum_(valid j<=t) d^(-m_j) x_j  +  d * carry )

``d^(-m)`` and ``d^m`` (``m < C``) come from a table computed in float64 and rounded once to the
accumulation type, so every weight ``d^(m_t - m_j)`` carries two roundings, never the compounding
``m * 2^-24`` of a float32 ``d`` multiplied ``m`` times. ``C`` is capped per ``d`` so that
``d^-(C-1) <= 2^20``: a chunk's scaled sum stays finite for ``|x| < 2^96`` (an input beyond that
may give inf where the trace is finite); ``d = 0`` under a floor gives ``C = 1``.
The carry between chunks is compensated like the C++ kernel's: ``d`` and ``d^m`` are applied to it
as ``hi + lo`` (two float32 numbers), so the carry chain never sees ``d`` rounded to float32.

Other styles (``L`` the floor window, ``k`` the valid-token index, windows ``a_k``, ``b_k``):

* ``recent``: ``a_k = 0`` (``max(0, k - L)`` with a floor), ``b_k = -1``;
* ``both``:   ``a_k = k//2 + 1`` (``max(k//2 + 1, k - L)``), ``b_k = k//2`` (``min(k//2, L)``),

``z_k = r_k - d^(k-a_k+1) r_(a_k-1) + Q_(b_k) + eps (P_(a_k-1) - P_(b_k))`` with ``P_k = sum_(j<=k)
x_j`` and ``Q_k = sum_(j<=k) d^j x_j`` (chunk cumsums plus a carry; index ``-1`` means 0). A chunk
writes ``r, P, Q`` to scratch in the accumulation type (float32 for float32 / half inputs; no
float64 scratch), indexed by valid-token index, then after a CTA barrier gathers them at
``a_k - 1`` and ``b_k`` (``<= k``: written by this or an earlier chunk of the same program).
``recent`` without a floor needs no scratch. Powers ``d^m`` for ``m <= T`` come from a float64
table rounded once (``[T]``, not input-sized).

The transpose (forward-view credit ``C_j = sum_(t>=j) w(t, j) a_t``) is the same pass run from the
end of the rows: the decayed window of ``j`` is ``t in [j, A_j]`` with ``A_j = j + L`` (recent) or
``min(2j - 1, j + L)`` (both), the early part ``t >= B_j`` has weight ``d^j`` (``B_j = 2j``, only
for ``j <= L`` under a floor), the middle ``eps``:
``C_j = s_j - d^(A_j-j+1) s_(A_j+1) + d^j S_(B_j) + eps (S_(A_j+1) - S_(B_j))`` with ``s`` the
reverse recent trace and ``S`` the suffix sum (index ``>= n`` means 0).

Accuracy: float32 and half inputs accumulate in float32 (the compensated scheme above; relative
errors at ``d = 0.999`` in line with the C++ kernel's float32 path); float64 inputs accumulate in
float64 (the same code with ``lo = 0``), which the float64 gradient checks use. Masked inputs are
never read (masked loads) so NaN/inf there cannot leak; masked outputs are written as exact zeros.

Normalised weights (``NORM``): a table ``1 / N_k`` of the valid position (computed in float64,
rounded once, :meth:`Schedule.inv_row_sums`) scales the output (forward) or the input as it is
loaded (transpose). The sequence style is its own kernel: a masked row sum (Kahan-compensated
float32 lanes) and count, then the mean written to the valid positions (self-adjoint, so one
kernel serves both directions).

Few rows (chunk-parallel ``recent``). One program per row group leaves most SMs idle when there
are few rows (``B = 64`` on a 132-SM GPU). On CUDA, padded inputs of fewer than
``SPLIT_MAX_ROWS`` rows, at least four chunks long, in the ``recent`` style without a binding
floor (normalised or not, both directions) take a chunk-parallel path instead: valid-token
counts per (chunk, row) from a mask pass; one program per (chunk, row) computes the chunk's
carry-free sum; one pass per row over its chunk sums gives each chunk's carry-in (the same
compensated recurrence as the single pass); one program per (chunk, row) writes the outputs. It
reads ``x`` twice (at best about 2/3 of the copy bandwidth without a mask), against the single
pass's once, so it serves only the few-rows case.

Rows up to ``2^30`` tokens. None of this has run on a GPU yet: it is tested under the Triton
interpreter and compiled ahead of time for sm_90 (``tests/test_kernel_triton.py``);
``benchmarks/gpu_check.py`` is the one-shot check to run on a CUDA machine.
"""

from __future__ import annotations

import functools
import math
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

MAX_BLOCK = 1024  # the longest chunk C on a GPU
TILE = 4096  # BR * C: elements of one [BR, C] tile
MIN_PROGRAMS = 264  # rows per program shrink until this many programs run (or BR = 1)
# C is capped so that d^-(C-1) <= 2^LOG2_RANGE (the chunk-local factorisation stays finite)
LOG2_RANGE = 20.0


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
    def _scalars(tab_ptr, C: tl.constexpr):
        """The scalars after the table's three length-C rows: d (split hi + lo), eps, d^(L+1)."""
        base = tab_ptr + 3 * C
        return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)

    @triton.jit
    def _rows(cu_ptr, R, T, VARLEN: tl.constexpr, BR: tl.constexpr):
        """The program's rows: (start offsets int64 [BR], lengths int32 [BR], 0 beyond R)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
        rin = rows < R
        if VARLEN:
            start = tl.load(cu_ptr + rows, mask=rin, other=0)
            length = tl.where(rin, (tl.load(cu_ptr + rows + 1, mask=rin, other=0) - start).to(tl.int32), 0)
        else:
            start = rows.to(tl.int64) * T
            length = tl.where(rin, T, 0).to(tl.int32)
        return start, length

    @triton.jit
    def _last(v, ar, C: tl.constexpr):
        """Column C-1 of a [BR, C] tile as [BR] (a select: other columns never enter)."""
        return tl.sum(tl.where(ar[None, :] == C - 1, v, 0.0), 1)

    @triton.jit
    def _recent_chunk(x, vi, carry, tab_ptr, d_hi, d_lo, ar, C: tl.constexpr):
        """The recent trace of one [BR, C] chunk and the next carry [BR] (see the module doc).

        ``vi``: int32 validity (1/0); ``x``: 0 at masked positions. Returns (r, new carry, valid
        count [BR], inclusive local counts n [BR, C]).
        """
        n = tl.cumsum(vi, 1)  # [BR, C] valid tokens of the chunk up to t
        m = tl.maximum(n - 1, 0)  # [BR, C]
        cs = tl.cumsum(x * tl.load(tab_ptr + m), 1)  # [BR, C] sum_j d^-m_j x_j
        # d * carry, compensated (hi + lo); d = 0 (a floor's C = 1) keeps nothing of the carry
        cd = tl.where(d_hi == 0.0, 0.0, carry * d_hi + carry * d_lo)  # [BR]
        r = tl.load(tab_ptr + C + m) * (cs + cd[:, None])  # [BR, C]
        N = tl.sum(vi, 1)  # [BR]
        ml = tl.maximum(N - 1, 0)  # [BR]
        s = _last(cs, ar, C) + cd  # [BR]
        nxt = tl.load(tab_ptr + C + ml) * s + tl.load(tab_ptr + 2 * C + ml) * s  # d^m (hi + lo) * s
        return r, tl.where(N > 0, nxt, carry), N, n

    @triton.jit
    def _trace_fwd_kernel(x_ptr, m_ptr, cu_ptr, out_ptr, r_ptr, p_ptr, q_ptr, tab_ptr, pw_ptr, inv_ptr,
                          L, R, T, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BOTH: tl.constexpr,
                          FLOOR: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
                          BR: tl.constexpr, C: tl.constexpr):
        start, length = _rows(cu_ptr, R, T, VARLEN, BR)  # [BR], [BR]
        d_hi, d_lo, eps, c_floor = _scalars(tab_ptr, C)
        ar = tl.arange(0, C)
        carry = tl.zeros([BR], ACC)
        p_carry = tl.zeros([BR], ACC)
        q_carry = tl.zeros([BR], ACC)
        kbase = tl.zeros([BR], tl.int32)
        for blk in range(0, tl.max(length, 0), C):
            offs = blk + ar  # [C]
            inb = offs[None, :] < length[:, None]  # [BR, C]
            ptrs = start[:, None] + offs[None, :]  # [BR, C] int64
            if HAS_MASK:
                valid = inb & (tl.load(m_ptr + ptrs, mask=inb, other=0) != 0)
            else:
                valid = inb
            x = tl.load(x_ptr + ptrs, mask=valid, other=0.0).to(ACC)  # [BR, C]; masked: never read
            vi = valid.to(tl.int32)
            r, carry, N, n = _recent_chunk(x, vi, carry, tab_ptr, d_hi, d_lo, ar, C)
            kk = kbase[:, None] + tl.maximum(n - 1, 0)  # [BR, C] valid-token index (clamped)
            kbase += N
            if BOTH or FLOOR:
                rb = start[:, None] + kk  # [BR, C] scratch slots (compacted)
                tl.store(r_ptr + rb, r, mask=valid)
                if FLOOR:
                    P = tl.cumsum(x, 1) + p_carry[:, None]  # [BR, C]
                    p_carry = _last(P, ar, C)
                    tl.store(p_ptr + rb, P, mask=valid)
                if BOTH:
                    wq = tl.load(pw_ptr + kk, mask=valid, other=0.0)  # d^k
                    Q = tl.cumsum(tl.where(valid, wq * x, 0.0), 1) + q_carry[:, None]  # [BR, C]
                    q_carry = _last(Q, ar, C)
                    tl.store(q_ptr + rb, Q, mask=valid)
                tl.debug_barrier()  # the gathers below read what this chunk just wrote
                if BOTH:
                    half = kk >> 1
                    if FLOOR:
                        ia = tl.maximum(half, kk - L - 1)  # a_k - 1 >= 0
                        ib = tl.minimum(half, L)  # b_k >= 0
                    else:
                        ia = half
                        ib = half
                    c = tl.load(pw_ptr + (kk - ia), mask=valid, other=0.0)  # d^(k - a_k + 1)
                    ra = tl.load(r_ptr + start[:, None] + ia, mask=valid, other=0.0)
                    qb = tl.load(q_ptr + start[:, None] + ib, mask=valid, other=0.0)
                    z = r - c * ra + qb
                    if FLOOR:
                        pa = tl.load(p_ptr + start[:, None] + ia, mask=valid, other=0.0)
                        pb = tl.load(p_ptr + start[:, None] + ib, mask=valid, other=0.0)
                        z = z + eps * (pa - pb)
                else:  # recent with a floor: a_k - 1 = k - L - 1, b_k = -1
                    ia = kk - L - 1
                    has = valid & (ia >= 0)
                    ia = tl.maximum(ia, 0)
                    ra = tl.load(r_ptr + start[:, None] + ia, mask=has, other=0.0)
                    pa = tl.load(p_ptr + start[:, None] + ia, mask=has, other=0.0)
                    z = r - c_floor * ra + eps * pa
            else:
                z = r
            if NORM:  # normalised: z_k / N_k
                z = z * tl.load(inv_ptr + kk, mask=valid, other=0.0)
            z = tl.where(valid, z, 0.0)
            tl.store(out_ptr + ptrs, z.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _trace_bwd_kernel(x_ptr, m_ptr, cu_ptr, out_ptr, s_ptr, S_ptr, tab_ptr, pw_ptr, inv_ptr,
                          L, R, T, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BOTH: tl.constexpr,
                          FLOOR: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
                          BR: tl.constexpr, C: tl.constexpr):
        """``W^T x``: the same pass from the end of the rows."""
        start, length = _rows(cu_ptr, R, T, VARLEN, BR)  # [BR], [BR]
        d_hi, d_lo, eps, c_floor = _scalars(tab_ptr, C)
        ar = tl.arange(0, C)
        maxlen = tl.max(length, 0)
        # n = number of valid tokens of each row (to count valid indices from the start)
        if HAS_MASK:
            cnt = tl.zeros([BR, C], tl.int32)
            for blk in range(0, maxlen, C):
                offs = blk + ar
                inb = offs[None, :] < length[:, None]
                mv = tl.load(m_ptr + start[:, None] + offs[None, :], mask=inb, other=0)
                cnt += (inb & (mv != 0)).to(tl.int32)
            n = tl.sum(cnt, 1)  # [BR]
        else:
            n = length
        carry = tl.zeros([BR], ACC)
        S_carry = tl.zeros([BR], ACC)
        cbase = tl.zeros([BR], tl.int32)  # valid tokens after the current chunk
        nblk = tl.cdiv(maxlen, C)
        for i in range(0, nblk):
            offs = (nblk - 1 - i) * C + (C - 1) - ar  # [C] descending positions
            inb = offs[None, :] < length[:, None]  # [BR, C]
            ptrs = start[:, None] + offs[None, :]  # [BR, C]
            if HAS_MASK:
                valid = inb & (tl.load(m_ptr + ptrs, mask=inb, other=0) != 0)
            else:
                valid = inb
            x = tl.load(x_ptr + ptrs, mask=valid, other=0.0).to(ACC)  # [BR, C]
            vi = valid.to(tl.int32)
            cv = tl.cumsum(vi, 1)  # [BR, C] valid tokens from the chunk's end
            kk = tl.minimum(tl.maximum(n[:, None] - (cbase[:, None] + cv), 0),
                            tl.maximum(n[:, None] - 1, 0))  # [BR, C] valid-token index (clamped)
            if NORM:  # normalised: the transpose reads y_k / N_k
                x = x * tl.load(inv_ptr + kk, mask=valid, other=0.0)
            s, carry, N, _ = _recent_chunk(x, vi, carry, tab_ptr, d_hi, d_lo, ar, C)
            cbase += N
            if BOTH or FLOOR:
                S = tl.cumsum(x, 1) + S_carry[:, None]  # [BR, C] suffix sum S_j
                S_carry = _last(S, ar, C)
                sb = start[:, None] + kk
                tl.store(s_ptr + sb, s, mask=valid)
                tl.store(S_ptr + sb, S, mask=valid)
                tl.debug_barrier()  # the gathers below read what this chunk just wrote
                nn = n[:, None]
                if BOTH:
                    ej = tl.load(pw_ptr + kk, mask=valid, other=0.0)  # d^j: early weight (and window decay)
                    ib = 2 * kk  # B_j
                    if FLOOR:
                        ia = tl.minimum(2 * kk, kk + L + 1)  # A_j + 1
                        c = tl.load(pw_ptr + tl.minimum(kk, L + 1), mask=valid, other=0.0)  # d^(A_j - j + 1)
                        ib = tl.where(kk <= L, ib, nn)  # no early part beyond L
                    else:
                        ia = ib
                        c = ej
                    ha = valid & (ia < nn)
                    hb = valid & (ib < nn)
                    sa = tl.load(s_ptr + start[:, None] + ia, mask=ha, other=0.0)
                    Sb = tl.load(S_ptr + start[:, None] + ib, mask=hb, other=0.0)
                    z = s - c * sa + ej * Sb
                    if FLOOR:
                        Sa = tl.load(S_ptr + start[:, None] + ia, mask=ha, other=0.0)
                        z = z + eps * (Sa - Sb)
                else:  # recent with a floor: A_j + 1 = j + L + 1, no early part
                    ia = kk + L + 1
                    ha = valid & (ia < nn)
                    sa = tl.load(s_ptr + start[:, None] + ia, mask=ha, other=0.0)
                    Sa = tl.load(S_ptr + start[:, None] + ia, mask=ha, other=0.0)
                    z = s - c_floor * sa + eps * Sa
            else:
                z = s
            z = tl.where(valid, z, 0.0)
            tl.store(out_ptr + ptrs, z.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _sequence_kernel(x_ptr, m_ptr, cu_ptr, out_ptr, R, T, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                         ACC: tl.constexpr, BR: tl.constexpr, C: tl.constexpr):
        """Sequence style: the mean of each row's valid inputs at its valid positions (0 elsewhere)."""
        start, length = _rows(cu_ptr, R, T, VARLEN, BR)  # [BR], [BR]
        ar = tl.arange(0, C)
        maxlen = tl.max(length, 0)
        acc = tl.zeros([BR, C], ACC)  # per-lane Kahan sums
        comp = tl.zeros([BR, C], ACC)
        cnt = tl.zeros([BR, C], tl.int32)
        for blk in range(0, maxlen, C):
            offs = blk + ar
            inb = offs[None, :] < length[:, None]
            ptrs = start[:, None] + offs[None, :]
            if HAS_MASK:
                valid = inb & (tl.load(m_ptr + ptrs, mask=inb, other=0) != 0)
            else:
                valid = inb
            y = tl.load(x_ptr + ptrs, mask=valid, other=0.0).to(ACC) - comp  # masked: never read
            t = acc + y
            comp = (t - acc) - y
            acc = t
            cnt += valid.to(tl.int32)
        n = tl.sum(cnt, 1)  # [BR]
        mean = (tl.sum(acc, 1) - tl.sum(comp, 1)) / tl.maximum(n, 1).to(ACC)  # [BR]
        for blk in range(0, maxlen, C):
            offs = blk + ar
            inb = offs[None, :] < length[:, None]
            ptrs = start[:, None] + offs[None, :]
            if HAS_MASK:
                valid = inb & (tl.load(m_ptr + ptrs, mask=inb, other=0) != 0)
            else:
                valid = inb
            z = tl.where(valid, tl.zeros([BR, C], ACC) + mean[:, None], 0.0)
            tl.store(out_ptr + ptrs, z.to(out_ptr.dtype.element_ty), mask=inb)

    # ------------------------------------------------------------------ chunk-parallel "recent"
    # For few rows: one program per (chunk, row) computes the chunk's local sum (A), one pass per row
    # over the chunk sums gives every chunk's carry-in (B), then one program per (chunk, row) writes
    # the outputs (C). Chunk c of a row covers positions [c C, c C + C) (REV: counted from the end).

    @triton.jit
    def _split_tile(x_ptr, m_ptr, kin_ptr, inv_ptr, ntot_ptr, T, NCH, HAS_MASK: tl.constexpr, REV: tl.constexpr,
                    NORM: tl.constexpr, ACC: tl.constexpr, C: tl.constexpr):
        """The program's chunk as a [1, C] tile: (x, int32 validity, pointers, in-bounds, valid index)."""
        c = tl.program_id(0)
        row = tl.program_id(1)
        ar = tl.arange(0, C)
        if REV:
            offs = T - 1 - (c * C + ar)  # [C] descending positions
        else:
            offs = c * C + ar  # [C]
        inb = ((offs >= 0) & (offs < T))[None, :]  # [1, C]
        ptrs = row.to(tl.int64) * T + offs[None, :]  # [1, C]
        if HAS_MASK:
            valid = inb & (tl.load(m_ptr + ptrs, mask=inb, other=0) != 0)
        else:
            valid = inb
        x = tl.load(x_ptr + ptrs, mask=valid, other=0.0).to(ACC)  # [1, C]
        vi = valid.to(tl.int32)
        kin = tl.load(kin_ptr + row * NCH + c)  # valid tokens before this chunk (in processing order)
        cv = tl.cumsum(vi, 1)  # [1, C]
        if REV:
            ntot = tl.load(ntot_ptr + row)
            kk = tl.minimum(tl.maximum(ntot - (kin + cv), 0), tl.maximum(ntot - 1, 0))  # [1, C]
        else:
            kk = kin + tl.maximum(cv - 1, 0)  # [1, C]
        if NORM and REV:  # the transpose reads y_k / N_k
            x = x * tl.load(inv_ptr + kk, mask=valid, other=0.0)
        return x, vi, valid, inb, ptrs, kk

    @triton.jit
    def _split_count_kernel(m_ptr, cnt_ptr, T, NCH, REV: tl.constexpr, C: tl.constexpr):
        """Valid tokens of each (chunk, row), in processing order."""
        c = tl.program_id(0)
        row = tl.program_id(1)
        ar = tl.arange(0, C)
        offs = T - 1 - (c * C + ar) if REV else c * C + ar  # [C]
        inb = ((offs >= 0) & (offs < T))[None, :]  # [1, C]
        mv = tl.load(m_ptr + row.to(tl.int64) * T + offs[None, :], mask=inb, other=0)
        tl.store(cnt_ptr + row * NCH + c + tl.arange(0, 1), tl.sum((inb & (mv != 0)).to(tl.int32), 1))

    @triton.jit
    def _split_local_kernel(x_ptr, m_ptr, kin_ptr, inv_ptr, ntot_ptr, sum_ptr, tab_ptr, T, NCH,
                            HAS_MASK: tl.constexpr, REV: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
                            C: tl.constexpr):
        """(A) ``sum_j d^-m_j x_j`` over the chunk (its carry-free state before the ``d^m`` factor)."""
        x, vi, valid, inb, ptrs, kk = _split_tile(x_ptr, m_ptr, kin_ptr, inv_ptr, ntot_ptr, T, NCH,
                                                  HAS_MASK, REV, NORM, ACC, C)
        m = tl.maximum(tl.cumsum(vi, 1) - 1, 0)  # [1, C]
        s = tl.sum(x * tl.load(tab_ptr + m), 1)  # [1]
        tl.store(sum_ptr + tl.program_id(1) * NCH + tl.program_id(0) + tl.arange(0, 1), s)

    @triton.jit
    def _split_carry_kernel(sum_ptr, cnt_ptr, cin_ptr, tab_ptr, R, NCH, ACC: tl.constexpr, BR: tl.constexpr,
                            C: tl.constexpr):
        """(B) every chunk's carry-in, chunk after chunk, the single pass's compensated recurrence."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
        rin = rows < R
        d_hi, d_lo, _, _ = _scalars(tab_ptr, C)
        carry = tl.zeros([BR], ACC)
        for c in range(0, NCH):
            tl.store(cin_ptr + rows * NCH + c, carry, mask=rin)
            N = tl.load(cnt_ptr + rows * NCH + c, mask=rin, other=0)  # [BR]
            s = tl.load(sum_ptr + rows * NCH + c, mask=rin, other=0.0)  # [BR]
            cd = tl.where(d_hi == 0.0, 0.0, carry * d_hi + carry * d_lo)
            ml = tl.maximum(N - 1, 0)
            t = s + cd
            nxt = tl.load(tab_ptr + C + ml) * t + tl.load(tab_ptr + 2 * C + ml) * t
            carry = tl.where(N > 0, nxt, carry)

    @triton.jit
    def _split_out_kernel(x_ptr, m_ptr, kin_ptr, inv_ptr, ntot_ptr, cnt_ptr, cin_ptr, out_ptr, tab_ptr, T, NCH,
                          HAS_MASK: tl.constexpr, REV: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
                          C: tl.constexpr):
        """(C) the chunk's outputs from its carry-in."""
        x, vi, valid, inb, ptrs, kk = _split_tile(x_ptr, m_ptr, kin_ptr, inv_ptr, ntot_ptr, T, NCH,
                                                  HAS_MASK, REV, NORM, ACC, C)
        d_hi, d_lo, _, _ = _scalars(tab_ptr, C)
        carry = tl.load(cin_ptr + tl.program_id(1) * NCH + tl.program_id(0) + tl.arange(0, 1))  # [1]
        z, _, _, _ = _recent_chunk(x, vi, carry, tab_ptr, d_hi, d_lo, tl.arange(0, C), C)
        if NORM and not REV:
            z = z * tl.load(inv_ptr + kk, mask=valid, other=0.0)
        z = tl.where(valid, z, 0.0)
        tl.store(out_ptr + ptrs, z.to(out_ptr.dtype.element_ty), mask=inb)


def chunk_cap(d: float) -> int:
    """The longest chunk for decay ``d``: the largest power of two ``C`` with
    ``d^-(C-1) <= 2^LOG2_RANGE`` (1 for ``d = 0``; unbounded, i.e. ``2^30``, for ``d = 1``)."""
    if d >= 1.0:
        return 1 << 30
    if d <= 0.0:
        return 1
    span = LOG2_RANGE / -math.log2(d)  # C - 1 <= span
    return 1 << int(math.floor(math.log2(span + 1.0))) if span >= 1.0 else 1


def _split(v: float, dtype: torch.dtype):
    """``v`` (float64) as ``hi + lo`` in ``dtype`` (``lo = 0`` for float64)."""
    if dtype == torch.float64:
        return v, 0.0
    hi = float(torch.tensor(v, dtype=torch.float64).to(dtype))
    return hi, v - hi


@functools.lru_cache(maxsize=64)
def _tables(d: float, eps: float, c_floor: float, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[3C + 4]`` in the accumulation type: ``d^-m``, ``d^m`` (hi), ``d^m`` (lo) for ``m < C``,
    then ``d`` (hi), ``d`` (lo), ``eps``, ``d^(L+1)``. Powers in float64, rounded once."""
    m = torch.arange(C, dtype=torch.float64)  # [C]
    dd = torch.tensor(d, dtype=torch.float64)
    pos = torch.pow(dd, m)  # [C] d^m (0^0 = 1)
    neg = torch.pow(dd, -m) if d > 0 else torch.ones(C, dtype=torch.float64)  # [C]; d = 0 only with C = 1
    hi = pos.to(dtype)  # [C]
    lo = (pos - hi.to(torch.float64)).to(dtype)  # [C]
    dh, dl = _split(d, dtype)
    tail = torch.tensor([dh, dl, eps, c_floor], dtype=torch.float64).to(dtype)  # [4]
    return torch.cat([neg.to(dtype), hi, lo, tail]).to(device)  # [3C + 4]


@functools.lru_cache(maxsize=16)
def _powers(d: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``d^m`` for ``m = 0..n`` computed in float64, rounded once to ``dtype``: ``[n + 1]``."""
    return torch.pow(torch.tensor(d, dtype=torch.float64), torch.arange(n + 1, dtype=torch.float64)).to(
        dtype=dtype, device=device)


def launch_shape(n_prog: int, max_len: int, d: float, block: Optional[int] = None,
                 rows: Optional[int] = None):
    """``(BR, C)``: rows per program and chunk length (powers of two).

    ``C``: ``block`` (tests) or ``min(MAX_BLOCK, next_pow2(max_len))``, then capped by
    :func:`chunk_cap`. ``BR``: ``rows`` (tests) or ``TILE // C`` rows, halved while fewer than
    ``MIN_PROGRAMS`` programs would run (never below 1, never above the rows there are).
    """
    C = block if block is not None else min(MAX_BLOCK, triton.next_power_of_2(max(int(max_len), 1)))
    C = max(1, min(C, chunk_cap(d)))
    if rows is None:
        rows = max(1, TILE // C)
        rows = min(rows, triton.next_power_of_2(max(n_prog, 1)))
        while rows > 1 and -(-n_prog // rows) < MIN_PROGRAMS and not _INTERPRET:
            rows //= 2
    return int(rows), int(C)

SPLIT_MAX_ROWS = MIN_PROGRAMS // 2  # 132 (an H100/H200's SMs): fewer rows take the chunk-parallel path


def _split_scan(x, m, has_mask: bool, sched, transpose: bool, C: int, acc, tl_acc, out):
    """Chunk-parallel ``recent`` trace without a floor, padded ``[R, T]``: for few rows, where one
    program per row group would leave most SMs idle. Counts per chunk (a mask pass, 1 byte per
    token), local chunk sums (A), a pass over each row's chunk sums for the carries (B), outputs
    (C): ``x`` is read twice. Same arithmetic as the single pass (same tables, same compensated carry)."""
    R, T = x.shape
    nch = triton.cdiv(T, C)
    dev = x.device
    if has_mask:
        cnt = torch.empty(R, nch, dtype=torch.int32, device=dev)  # [R, nch]
        _split_count_kernel[(nch, R)](m, cnt, T, nch, REV=bool(transpose), C=C, num_warps=4)
    else:
        cnt = (T - torch.arange(nch, device=dev, dtype=torch.int32) * C).clamp(max=C)  # [nch]
        cnt = cnt.expand(R, nch).contiguous()  # [R, nch]
    kin = (torch.cumsum(cnt, 1, dtype=torch.int32) - cnt).contiguous()  # [R, nch] valid tokens before
    ntot = cnt.sum(1, dtype=torch.int32)  # [R]
    tab = _tables(float(sched.d), float(sched.eps), 0.0, C, acc, dev)  # [3C + 4]
    norm = bool(sched.normalize)
    inv = sched.inv_row_sums(T, acc, dev) if norm else tab  # [T] 1 / N_k
    sums = torch.empty(R, nch, dtype=acc, device=dev)  # [R, nch] chunk-local sums
    cin = torch.empty(R, nch, dtype=acc, device=dev)  # [R, nch] carry into each chunk
    warps = 4 if C <= 1024 else 8
    _split_local_kernel[(nch, R)](x, m, kin, inv, ntot, sums, tab, T, nch, HAS_MASK=has_mask, REV=bool(transpose),
                                  NORM=norm, ACC=tl_acc, C=C, num_warps=warps)
    BR = min(triton.next_power_of_2(R), 64)
    _split_carry_kernel[(triton.cdiv(R, BR),)](sums, cnt, cin, tab, R, nch, ACC=tl_acc, BR=BR, C=C, num_warps=2)
    _split_out_kernel[(nch, R)](x, m, kin, inv, ntot, cnt, cin, out, tab, T, nch, HAS_MASK=has_mask,
                                REV=bool(transpose), NORM=norm, ACC=tl_acc, C=C, num_warps=warps)
    return out


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               sched, transpose: bool, *, block: Optional[int] = None, rows: Optional[int] = None,
               split: Optional[bool] = None) -> torch.Tensor:
    """The trace (or its transpose) by the Triton kernel; see :mod:`creditlib.ops.trace`.

    ``block`` and ``rows`` (tests only) override the chunk length (a power of two, still capped by
    :func:`chunk_cap`) and the rows per program (a power of two) to exercise the carries across
    chunks and partly filled row groups on small inputs. ``split`` (tests only) forces (True) or
    forbids (False) the chunk-parallel path, which by default (None) serves CUDA inputs of fewer than
    ``SPLIT_MAX_ROWS`` padded rows, at least 4 chunks long, ``recent`` without a binding floor.

    NaN/inf valid inputs: the chunk factorisation would turn an infinity into NaN (``inf - inf``)
    and spread it, so an output sum that is not finite sends the call to
    :func:`creditlib.ops.trace.nonfinite_scan` (the same +inf/-inf/NaN pattern as every backend).
    That check is one reduction over the output (one read pass on the GPU; not timed on a device).
    """
    def scan(xs, ms, cs, sc, tr):
        return _trace_scan(xs, ms, cs, sc, tr, block=block, rows=rows, split=split)

    out = scan(x, mask_u8, cu_seqlens, sched, transpose)
    if out.numel() == 0 or bool(torch.isfinite(out.sum(dtype=torch.float32 if out.dtype != torch.float64 else None))):
        return out
    from . import nonfinite_scan

    return nonfinite_scan(x.contiguous(), mask_u8, cu_seqlens, sched, transpose, scan, out)


def _trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                sched, transpose: bool, *, block: Optional[int] = None, rows: Optional[int] = None,
                split: Optional[bool] = None) -> torch.Tensor:
    """:func:`trace_scan` without the non-finite check."""
    if not available():
        raise RuntimeError("the Triton trace kernel needs triton and a CUDA device "
                           "(or TRITON_INTERPRET=1 set before creditlib is imported)")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not (x.is_cuda or _INTERPRET):
        raise ValueError(f"x must be a CUDA tensor for the triton backend, got device {x.device}")
    for name, v in (("block", block), ("rows", rows)):
        if v is not None and (not isinstance(v, int) or v < 1 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 1, got {v!r}")
    d, eps, both = float(sched.d), float(sched.eps), sched.both
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
    if varlen and (both or sched.normalize or max_len >= (1 << 30)):  # tables sized by the longest sequence (one sync)
        max_len = max(int((cu[1:] - cu[:-1]).max()), 1)
    if max_len >= (1 << 30):
        raise ValueError(f"sequences of 2^30 tokens or more are not supported by the triton backend, got {max_len}")

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    has_mask = not varlen and mask_u8 is not None
    if sched.sequence:
        BR, C = launch_shape(n_prog, max_len, 1.0, block, rows)
        _sequence_kernel[(triton.cdiv(n_prog, BR),)](x, m, cu, out, n_prog, T, HAS_MASK=has_mask, VARLEN=varlen,
                                                     ACC=tl_acc, BR=BR, C=C, num_warps=4 if BR * C <= 2048 else 8)
        return out
    L = sched.window
    floor = L is not None and L < max_len  # the floor binds somewhere in this tensor
    L = int(L) if floor else 0
    c_floor = d ** (L + 1) if floor else 0.0  # Python float64
    BR, C = launch_shape(n_prog, max_len, d, block, rows)
    need = both or floor
    if split is None:
        split = x.is_cuda and not varlen and not need and n_prog < SPLIT_MAX_ROWS and max_len >= 4 * C
    if split:
        if varlen or need:
            raise ValueError("split=True needs padded rows and the recent style without a binding floor")
        return _split_scan(x, m, has_mask, sched, transpose, C, acc, tl_acc, out)
    tab = _tables(d, eps, c_floor, C, acc, x.device)  # [3C + 4]
    pw = _powers(d, max_len, acc, x.device) if both else tab  # [max_len + 1] d^m
    inv = sched.inv_row_sums(max_len, acc, x.device) if sched.normalize else tab  # [max_len] 1 / N_k
    numel = x.numel()
    grid = (triton.cdiv(n_prog, BR),)
    warps = 4 if BR * C <= 2048 else 8
    if transpose:
        s_buf = torch.empty(numel if need else 1, dtype=acc, device=x.device)  # [R*T] or [N] scratch
        S_buf = torch.empty(numel if need else 1, dtype=acc, device=x.device)
        _trace_bwd_kernel[grid](x, m, cu, out, s_buf, S_buf, tab, pw, inv, L, n_prog, T,
                                HAS_MASK=has_mask, VARLEN=varlen, BOTH=bool(both), FLOOR=floor,
                                NORM=bool(sched.normalize), ACC=tl_acc, BR=BR, C=C, num_warps=warps, num_stages=1)
    else:
        r_buf = torch.empty(numel if need else 1, dtype=acc, device=x.device)  # [R*T] or [N] scratch
        p_buf = torch.empty(numel if floor else 1, dtype=acc, device=x.device)
        q_buf = torch.empty(numel if both else 1, dtype=acc, device=x.device)
        _trace_fwd_kernel[grid](x, m, cu, out, r_buf, p_buf, q_buf, tab, pw, inv, L, n_prog, T,
                                HAS_MASK=has_mask, VARLEN=varlen, BOTH=bool(both), FLOOR=floor,
                                NORM=bool(sched.normalize), ACC=tl_acc, BR=BR, C=C, num_warps=warps, num_stages=1)
    return out
