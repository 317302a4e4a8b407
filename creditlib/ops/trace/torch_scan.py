"""Pure-PyTorch O(T) eligibility trace: the fallback when no compiled kernel is available.

Plan (all O(T) time and memory, no T x T matrix, no Python loop over time steps, no ``d**-t``):

1. **Compaction** (general path). Move each row's valid tokens to the front (one scatter; skipped
   when the mask is all-valid or right-padded). Valid-token positions then equal array positions
   and every style becomes index arithmetic that is the same for all rows.
2. **Recent trace** ``r_t = d r_{t-1} + x_t`` by a chunked matmul: each chunk of ``C`` tokens is
   multiplied by the constant ``C x C`` matrix ``d**(i-k)`` (lower triangular); the chunk carries
   ``s_k = d^C s_{k-1} + e_k`` come from the closed form ``a^k cumsum(a^-k e)`` in float64 while
   ``a^-k`` stays under ``e^600`` (else the same scan on the carries, recursively), and one in-place
   ``baddbmm_`` adds each carry times ``d^(i+1)`` to its chunk. Powers of ``d`` in float64, then cast.

   Fast paths for ``recent`` without a floor (no compaction): right-padded rows
   (:func:`_recent_padded`: the padding is zeroed in the output, one view per row for a few rows;
   backward, only the chunk holding each row's end is redone masked; while ``T (-ln d)`` stays in
   the dtype's range, :func:`_padded_scan` folds the carries into one ``addcmul_`` as
   ``d^(t+1) cumsum(d^(-C k) e_k)``, carries in the compute dtype, none formed at full size) and any other
   mask (:func:`_recent_runs`: all-valid chunks as above, all-masked chunks pass the carry on, the
   chunks where runs start or end token by token).
   Both reveal a NaN/inf input through their carries and then leave it to the general path.
3. **Other styles** from ``r``, the plain prefix sum ``P`` and the early prefix sum
   ``S_m = sum_{j<=m} d**j x_j``. With window start ``a_t`` and early end ``b_t``
   (see ``docs/trace.md``)::

       z_t = (r_t - d**(t-a_t+1) r_{a_t-1}) + S_{b_t} + eps (P_{a_t-1} - P_{b_t})

   The transpose (backward pass, forward-view credit) is the mirror image with suffix sums.
4. **Normalised weights** divide row ``t`` by ``N_t`` (a float64 table of the valid position,
   :meth:`Schedule.row_sums`): the output after the scan, or the input before the transposed scan.
   The **sequence** style is a masked row mean broadcast to the valid tokens (self-adjoint).

Non-finite valid inputs: the chunked matmul would spread them to *earlier* tokens (``0 * inf``), so
rows holding any are scanned with them zeroed, and the +inf, -inf and NaN inputs are traced as 0/1
indicators with the support weights (:meth:`Schedule.support`) to put +inf, -inf or NaN exactly
where they reach (:func:`creditlib.ops.trace.place_nonfinite`, the rule every backend follows).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import Schedule, nonfinite_classes, place_nonfinite, varlen_to_padded

CHUNK = 16  # chunk length of the matmul scan (16 and 32 tie on this AVX-512 CPU; 8 is slower)
# The chunk carries use the closed form a^k * cumsum(a^-k e) in float64 while the largest factor
# a^-k stays below e^CARRY_MAX_EXP (far inside float64's range for any float32 input); longer or
# faster-decaying sequences recurse on the carries instead.
CARRY_MAX_EXP = 600.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=32)
def _decay_matrix(d: float, C: int, dtype: torch.dtype, device, transpose: bool = False) -> torch.Tensor:
    """``M[k, i] = d**(i - k)`` for ``k <= i`` else 0, so that ``x_chunk @ M`` is the local scan
    (``transpose=True``: ``M.T``, contiguous, the local suffix scan). Powers in float64, then cast."""
    i = torch.arange(C, dtype=torch.float64, device=device)
    lag = i[None, :] - i[:, None]  # [C, C] (k, i) -> i - k
    M = torch.where(lag >= 0, torch.pow(torch.tensor(d, dtype=torch.float64, device=device), lag.clamp_min(0)),
                    torch.zeros((), dtype=torch.float64, device=device))  # [C, C]
    return (M.T if transpose else M).contiguous().to(dtype)


@functools.lru_cache(maxsize=32)
def _carry_powers(d: float, C: int, dtype: torch.dtype, device, reverse: bool) -> torch.Tensor:
    """How a carry reaches each position of the next chunk, ``[1, C]``: ``d^(i+1)`` forward,
    ``d^(C-i)`` for the suffix scan."""
    i = torch.arange(C, dtype=torch.float64, device=device)  # [C]
    e = C - i if reverse else i + 1  # [C]
    return torch.pow(torch.tensor(d, dtype=torch.float64, device=device), e).to(dtype).view(1, C)  # [1, C]


@functools.lru_cache(maxsize=16)
def _carry_table(a: float, n: int, device):
    """``(a^k, a^-k)`` for ``k = 0..n-1``, float64 ``[n]`` each (``a^-k`` as its own power: no
    division on the hot path)."""
    base = torch.tensor(a, dtype=torch.float64, device=device)
    k = torch.arange(n, dtype=torch.float64, device=device)  # [n]
    return torch.pow(base, k), torch.pow(base, -k)  # [n], [n]


def _carry_scan(e: torch.Tensor, a: float, reverse: bool) -> torch.Tensor:
    """``s_k = a s_{k-1} + e_k`` (``reverse``: ``s_k = a s_{k+1} + e_k``) along the last dim of the
    chunk values ``e`` ``[R, n]``, for ``0 <= a < 1``.

    Closed form in float64, ``s = a^k cumsum(a^-k e)`` (reverse ``a^-k rcumsum(a^k e)``), when
    ``n (-ln a) <= CARRY_MAX_EXP`` (no factor leaves float64's range), else the chunked scan on
    the carries themselves. A NaN or inf in ``e_k`` makes ``s_k`` non-finite.
    """
    R, n = e.shape
    if a == 0.0:  # d**C underflowed: no carry survives a whole chunk
        return e.clone()
    if n * -math.log(a) > CARRY_MAX_EXP:
        return _scan(e.contiguous(), a, reverse)[0]
    ak, a_k = _carry_table(a, n, e.device)  # [n] a^k >= e^-600, a^-k <= e^600
    e64 = e.to(torch.float64, copy=True)  # [R, n] (e may be a view of the chunk scan)
    if reverse:
        s = torch.cumsum(e64.mul_(ak).flip(-1), dim=-1).flip(-1).mul_(a_k)  # [R, n]
    else:
        s = torch.cumsum(e64.mul_(a_k), dim=-1).mul_(ak)  # [R, n]
    return s.to(e.dtype)


def _scan(x: torch.Tensor, d: float, reverse: bool, lens: Optional[torch.Tensor] = None):
    """``(r, probe)``: ``r`` the scan of :func:`recent_scan`, ``probe`` a small tensor that is all
    finite exactly when every input that was read is finite and nothing overflowed (a NaN or inf
    in a row reaches that row's chunk carries, through the ``0 * inf`` of the chunk matmul at worst).

    ``lens`` (int64 ``[R]``, only with ``reverse`` and ``T > CHUNK``): row ``r``'s inputs at
    ``t >= lens[r]`` are padding and are never read into a position ``t < lens[r]`` (their chunk
    totals are dropped and the chunk holding ``lens[r]`` is redone masked); the outputs at
    ``t >= lens[r]`` are left for the caller to zero. A forward scan is causal and needs no ``lens``.
    """
    R, T = x.shape
    if d == 0.0 or T <= 1:
        out = x.clone()  # [R, T]
        return out, out
    if d == 1.0:
        if reverse:
            tot = x.sum(dim=-1, keepdim=True)  # [R, 1]
            return (tot - torch.cumsum(x, dim=-1)).add_(x), tot
        out = torch.cumsum(x, dim=-1)  # [R, T]
        return out, out[:, -1]
    C = CHUNK
    if T <= C:
        out = x @ _decay_matrix(d, T, x.dtype, x.device, reverse)  # [R, T]
        return out, out
    n = -(-T // C)  # chunks
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, n * C - T))  # [R, n*C] zeros at the end change nothing
    M = _decay_matrix(d, C, x.dtype, x.device, reverse)  # [C, C]
    local = x.view(R, n, C) @ M  # [R, n, C] scan inside each chunk
    # Each chunk's own total (at its end; reversed: at its start), then the carries between chunks.
    e = local[:, :, 0 if reverse else -1]  # [R, n] (strided view)
    if lens is not None:
        kb = (lens // C).clamp_max(n - 1)  # [R] the chunk holding position lens (or the last one)
        inside = (torch.arange(C, device=x.device)[None, :] < (lens - kb * C)[:, None]).to(x.dtype)  # [R, C]
        at = kb.view(R, 1, 1).expand(R, 1, C)  # [R, 1, C]
        xb = x.view(R, n, C).gather(1, at)[:, 0] * inside  # [R, C] that chunk, padding zeroed
        local.scatter_(1, at, (xb @ M).unsqueeze(1))  # redo it
        keep = torch.arange(n, device=x.device)[None, :] * C < lens[:, None]  # [R, n] chunks with a valid token
        e = torch.where(keep, e, torch.zeros((), dtype=x.dtype, device=x.device))  # [R, n]
    carry = _carry_scan(e, d ** C, reverse)  # [R, n]
    shifted = torch.zeros(R, n, 1, dtype=x.dtype, device=x.device)  # [R, n, 1] carry entering each chunk
    if reverse:
        shifted[:, :-1, 0] = carry[:, 1:]  # suffix from the next chunk
    else:
        shifted[:, 1:, 0] = carry[:, :-1]  # carry from the previous chunk
    pw = _carry_powers(d, C, x.dtype, x.device, reverse).expand(R, 1, C)  # [R, 1, C]
    local.baddbmm_(shifted, pw)  # in place: local += carry (x) powers, one pass
    return local.view(R, n * C)[:, :T], carry


def recent_scan(x: torch.Tensor, d: float, reverse: bool = False) -> torch.Tensor:
    """``r_t = d r_{t-1} + x_t`` along the last dim of ``x`` ``[R, T]`` (no mask).

    ``reverse=True`` gives the suffix form ``u_t = d u_{t+1} + x_t`` (the transpose), without flips.
    """
    return _scan(x, d, reverse)[0]


def _pow(d: float, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d**k`` for an integer tensor ``k >= 0``, computed in float64 (``0**0 = 1``)."""
    base = torch.tensor(d, dtype=torch.float64, device=k.device)
    return torch.pow(base, k.to(torch.float64)).to(dtype)


def _both_head(x: torch.Tensor, r: torch.Tensor, d: float, n: int) -> torch.Tensor:
    """Style ``both`` without floor at ``t < n``, in place on ``r[:, :n]``:
    ``z_t = r_t - d^ceil(t/2) r_{t//2} + S_{t//2}`` with ``S_k = sum_{j<=k} d^j x_j``."""
    H = (n + 1) // 2  # indices k = t // 2 needed
    k = torch.arange(H, device=x.device)  # [H]
    dk = _pow(d, k, x.dtype)  # [H]
    S = torch.cumsum(x[:, :H] * dk, dim=-1)  # [R, H]
    rk = r[:, :H].clone()  # [R, H] read before r is updated in place
    r[:, 0:n:2] += S - dk * rk  # t = 2k:   - d^k r_k + S_k
    n_odd = n // 2
    r[:, 1:n:2] += S[:, :n_odd] - (d * dk[:n_odd]) * rk[:, :n_odd]  # t = 2k+1: - d^(k+1) r_k + S_k
    return r[:, :n]


def _forward_dense_rows(x: torch.Tensor, sched: Schedule) -> torch.Tensor:
    """Trace of rows whose valid tokens are a prefix (zeros after). ``x`` ``[R, T]``.

    Window start ``a_t`` and early end ``b_t`` per style (``L`` = :attr:`DecayStyle.window`):
    recent ``a = max(0, t-L)``, ``b = -1``; both ``a = max(t//2+1, t-L)``, ``b = min(t//2, L)``.
    """
    R, T = x.shape
    d, eps, both, L = sched.d, sched.eps, sched.both, sched.window
    r = recent_scan(x, d)  # [R, T]
    if not both and L is None:
        return r
    if not both:  # recent with a floor: z_t = r_t - d^(L+1) r_{t-L-1} + eps P_{t-L-1}
        k = L + 1
        if k < T:
            P = torch.cumsum(x[:, : T - k], dim=-1)  # [R, T-k]
            r[:, k:] += eps * P - (d ** k) * r[:, : T - k]
        return r
    if L is None or T <= 2 * L + 2:  # both, the floor never binds here: a-1 = b = t//2
        return _both_head(x, r, d, T)
    # both with a floor: t <= 2L+1 as without floor; t >= 2L+2: a-1 = t-L-1, b = L
    n = 2 * L + 2
    z = torch.empty_like(r)
    k = L + 1
    SL = (x[:, :k] * _pow(d, torch.arange(k, device=x.device), x.dtype)).sum(-1, keepdim=True)  # [R, 1]
    P = torch.cumsum(x[:, k: T - k], dim=-1)  # [R, T-2k]  sum_{j=L+1..t-L-1} x_j
    z[:, n:] = r[:, n:] - (d ** k) * r[:, k: T - k] + SL + eps * P
    z[:, :n] = _both_head(x, r, d, n)  # last: it updates r[:, :n] in place
    return z


def _transpose_dense_rows(y: torch.Tensor, sched: Schedule) -> torch.Tensor:
    """``W^T y`` for rows whose valid tokens are a prefix (zeros after). ``y`` ``[R, T]``.

    ``g_j = sum_{t>=j} w(t, j) y_t``. With ``u`` the reverse recent trace and ``Q`` suffix sums:
    recent+floor ``g_j = u_j - d^(L+1) u_{j+L+1} + eps Q_{j+L+1}``; both (``j <= L``)
    ``g_j = u_j + d^j (Q_{2j} - u_{2j})``, (``j > L``) as recent+floor.
    """
    R, T = y.shape
    d, eps, both, L = sched.d, sched.eps, sched.both, sched.window
    u = recent_scan(y, d, reverse=True)  # [R, T] u_j = sum_{t>=j} d^(t-j) y_t
    if not both and L is None:
        return u
    if not both:
        k = L + 1
        if k < T:
            Q = torch.cumsum(y.flip(-1)[:, : T - k], dim=-1).flip(-1)  # [R, T-k] Q_{j+k}
            u[:, : T - k] += eps * Q - (d ** k) * u[:, k:]
        return u
    g = u.clone()
    H = (T + 1) // 2  # j with 2j < T
    n = H if L is None else min(H, L + 1)  # head: j <= L
    j = torch.arange(n, device=y.device)  # [n]
    Q2 = torch.cumsum(y.flip(-1), dim=-1).flip(-1)[:, 0: 2 * n: 2]  # [R, n] Q_{2j}
    g[:, :n] += _pow(d, j, y.dtype) * (Q2 - u[:, 0: 2 * n: 2])
    if L is not None:
        k = L + 1
        if k < T:  # tail j >= L+1 (for j <= L the lag form is out of range or replaced above)
            Qk = torch.cumsum(y.flip(-1)[:, : T - 2 * k], dim=-1).flip(-1) if T > 2 * k else None
            if Qk is not None:
                g[:, k: T - k] += eps * Qk - (d ** k) * u[:, 2 * k:]
    return g


def _rows(x: torch.Tensor, sched: Schedule, transpose: bool) -> torch.Tensor:
    """``W x`` / ``W^T x`` of rows whose valid tokens are a prefix (zeros after), all finite."""
    if sched.normalize:
        inv = sched.inv_row_sums(x.shape[-1], x.dtype, x.device)  # [T] 1 / N_k
        if transpose:
            return _transpose_dense_rows(x * inv, sched)
        return _forward_dense_rows(x, sched).mul_(inv)
    return (_transpose_dense_rows if transpose else _forward_dense_rows)(x, sched)


def _rows_nonfinite(x: torch.Tensor, sched: Schedule, transpose: bool) -> torch.Tensor:
    """As :func:`_rows` when some inputs may be NaN/inf: they reach exactly their support, with the
    values of :func:`creditlib.ops.trace.place_nonfinite` (-inf alone gives -inf, never NaN)."""
    if bool(torch.isfinite(x.sum())):
        return _rows(x, sched, transpose)
    bad = ~torch.isfinite(x)  # [R, T]
    z = _rows(torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x), sched, transpose)  # [R, T]
    ind = nonfinite_classes(x, None).to(x.dtype).view(3 * x.shape[0], x.shape[1])  # [3R, T] +inf, -inf, NaN
    reach = _rows(ind, sched.support(), transpose).view(3, *x.shape)  # [3, R, T] counts of reaching inputs
    return place_nonfinite(z, reach)


def _sequence(x: torch.Tensor, valid: Optional[torch.Tensor], cd: torch.dtype) -> torch.Tensor:
    """Each valid token gets its row's mean over valid tokens (the operator is its own transpose)."""
    xc = x.to(cd)  # [R, T]
    if valid is None:
        return xc.mean(-1, keepdim=True).expand_as(xc).to(x.dtype)
    zero = torch.zeros((), dtype=cd, device=x.device)
    xv = torch.where(valid, xc, zero)  # [R, T] masked inputs never enter (NaN-safe)
    n = valid.sum(-1, keepdim=True).clamp_min(1).to(cd)  # [R, 1]
    mean = xv.sum(-1, keepdim=True) / n  # [R, 1]
    return torch.where(valid, mean.expand_as(xc), zero).to(x.dtype)


_ONES8 = 0x0101010101010101  # eight bytes of 1 (a full 8-token word of a 0/1 mask read as int64)


def _right_padded(mask_u8: torch.Tensor) -> Optional[torch.Tensor]:
    """Row lengths (int64 ``[R]``) when every byte is 0 or 1 and each row's valid tokens form a
    prefix (right padding), else ``None``.

    Bytes that never increase along a row from a first byte ``<= 1`` are all 0 or 1 and their ones
    form a prefix, so it takes ``m[:, 1:] > m[:, :-1]`` reduced by a uint8 ``amax`` (a bool ``any``
    cost ten times more on the Zen 4 of docs/benchmarks.md) and the first column's ``amax``. The
    length is one binary search per row in the ascending row ``1 - m`` (at its first 1). Three byte
    passes in all (any layout, no word alignment needed), one host sync.
    """
    R, T = mask_u8.shape
    if T == 0 or R == 0:
        return torch.zeros(R, dtype=torch.int64, device=mask_u8.device)
    top = mask_u8[:, 0].amax()  # [] uint8, <= 1 for 0/1 first bytes
    if T > 1:  # an increase anywhere counts as 2 (0 or 2; a bool tensor is reduced as its bytes)
        inc = torch.gt(mask_u8[:, 1:], mask_u8[:, :-1]).view(torch.uint8).amax()  # []
        top = torch.maximum(top, inc.mul_(2))
    pad = torch.rsub(mask_u8, 1)  # [R, T] uint8 0...0 1...1 when right padded
    lens = torch.searchsorted(pad, torch.ones(R, 1, dtype=torch.uint8, device=mask_u8.device))  # [R, 1]
    if int(top) > 1:
        return None
    return lens.view(R)  # [R] int64


# Up to this many rows, and from this length on, the padding of right-padded rows is zeroed row by
# row (one view per row, all zeroed by one ``_foreach_zero_``) instead of multiplying the whole
# [R, T] output by a float mask (two passes).
ROW_LOOP_MAX = 256
ROW_LOOP_MIN_T = 1024


def _odd_bytes(mask_u8: torch.Tensor) -> bool:
    """Whether some byte of the mask is neither 0 nor 1 (one reduction over the bytes)."""
    return int(mask_u8.max()) > 1


# The fast right-padded `recent` scan (:func:`_padded_scan`) takes its carries as ``d^(t+1) X_k``
# with ``X = cumsum(d^(-C k) e_k)``: the factors span ``e^(+-T (-ln d))``, which must stay well inside
# the compute dtype's normal range (float32: e^+-87; float64: as CARRY_MAX_EXP). Longer or faster
# decaying rows take :func:`_scan`'s float64 carries instead.
FAST_MAX_EXP = {torch.float32: 60.0, torch.float64: CARRY_MAX_EXP}


# _padded_scan's tables (~T elements) are cached up to this length; longer rows recompute them (a pass)
TABLE_CACHE_MAX_T = 1 << 20


def _padded_tables(d: float, n: int, C: int, dtype: torch.dtype, device, reverse: bool):
    """:func:`_make_padded_tables`, cached for rows up to :data:`TABLE_CACHE_MAX_T` tokens."""
    if n * C <= TABLE_CACHE_MAX_T:
        return _padded_tables_cached(d, n, C, dtype, device, reverse)
    return _make_padded_tables(d, n, C, dtype, device, reverse)


@functools.lru_cache(maxsize=16)
def _padded_tables_cached(d: float, n: int, C: int, dtype: torch.dtype, device, reverse: bool):
    return _make_padded_tables(d, n, C, dtype, device, reverse)


def _make_padded_tables(d: float, n: int, C: int, dtype: torch.dtype, device, reverse: bool):
    """``(ak, pt)`` for :func:`_padded_scan`, both in ``dtype``: ``ak`` ``[n]`` the chunk factors
    ``d^(-C k)`` (reverse ``d^(C k)``), ``pt`` ``[n-1, C]`` the position factors ``d^(C k + i + 1)``
    (reverse, for chunk ``k = 0..n-2``: ``d^-(C k + i)``). Powers of ``d`` in float64, then cast
    (each factor within one rounding of the exact power; :data:`FAST_MAX_EXP` keeps them normal)."""
    base = torch.tensor(d, dtype=torch.float64, device=device)
    k = torch.arange(n, dtype=torch.float64, device=device)  # [n]
    ak = torch.pow(base, (C * k) if reverse else (-C * k)).to(dtype)  # [n]
    t = torch.arange((n - 1) * C, dtype=torch.float64, device=device)  # [(n-1) C] positions C k + i
    pt = torch.pow(base, -t if reverse else t + 1).to(dtype).view(n - 1, C)  # [n-1, C]
    return ak, pt


def _padded_scan_applies(T: int, d: float, dtype: torch.dtype) -> Optional[int]:
    """The number of chunks when :func:`_padded_scan` applies, else ``None``."""
    if T <= CHUNK or not (0.0 < d < 1.0) or dtype not in FAST_MAX_EXP:
        return None
    n = -(-T // CHUNK)
    return n if n * CHUNK * -math.log(d) <= FAST_MAX_EXP[dtype] else None


def _padded_scan(x: torch.Tensor, lens: Optional[torch.Tensor], d: float, reverse: bool):
    """The ``recent`` scan of right-padded rows (``lens`` int64 ``[R]``, ``None``: all valid) in
    three passes over ``[R, T]`` (the matmul, the read of its chunk totals, one fused multiply-add
    in place), or ``None`` when it does not apply here (``T <= CHUNK``, ``d`` not
    in ``(0, 1)``, or ``T (-ln d)`` beyond :data:`FAST_MAX_EXP`). Returns ``(z, probe)`` as
    :func:`_scan`; the outputs at padded positions are left for the caller to zero.

    One chunked matmul gives the local scans; their chunk totals (read straight from it) ``e_k``
    give ``X_k = sum_{j<=k} d^(-C j) e_j`` by one cumsum in the compute dtype (reverse: the suffix sums of
    ``d^(C j) e_j``), and one fused ``addcmul_`` adds ``d^(t+1) X_{k-1}`` (reverse:
    ``d^-t X_{k+1}``) to every position ``t`` of chunk ``k``: the carry ``d^(i+1) s_{k-1}`` with
    ``s_k = d^(C k) X_k`` never formed. Forward the scan is causal (padding reaches only padded
    outputs); reverse, the chunks after a row's end are dropped from ``X`` and the chunk holding it
    is redone with its padding zeroed, so padding is never read into a valid position.
    ``X`` is held in the compute dtype (float32 for float32 input): each product ``d^(-C j) e_j``
    and each ``X_k`` is rounded once, so the error stays within the output's own rounding bound
    ``eps sum_j d^(t-j) |x_j|`` (a float64 ``X`` cast to float32 gave the same bound with one
    rounding fewer). ``probe`` (``[R, n]``, ``X``) is all finite exactly when every input read is
    finite and nothing left the dtype's range.
    """
    R, T = x.shape
    C = CHUNK
    dt, dev = x.dtype, x.device
    n = _padded_scan_applies(T, d, dt)
    if n is None:
        return None
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, n * C - T))  # [R, n*C] zeros at the end change nothing
    M = _decay_matrix(d, C, dt, dev, reverse)  # [C, C]
    ak, pt = _padded_tables(d, n, C, dt, dev, reverse)  # [n], [n-1, C]
    local = x.view(R, n, C) @ M  # [R, n, C] scan inside each chunk
    if reverse:
        if lens is not None:
            kb = (lens // C).clamp_max(n - 1)  # [R] the chunk holding position lens (or the last one)
            at = torch.arange(R, device=dev) * n + kb  # [R] its row in the [R*n, C] view
            inside = (torch.arange(C, device=dev) < (lens - kb * C)[:, None]).to(dt)  # [R, C] 0/1
            xb = x.view(R * n, C).index_select(0, at).mul_(inside)  # [R, C] that chunk, padding zeroed
            local.view(R * n, C).index_copy_(0, at, xb @ M)  # redo it
            keep = torch.arange(n, device=dev) * C < lens[:, None]  # [R, n] chunks with a valid token
            ak = torch.where(keep, ak, torch.zeros((), dtype=dt, device=dev))  # [R, n]
        X = (local[:, :, 0] * ak).flip(-1).cumsum_(-1).flip(-1)  # [R, n] suffix sums
        local[:, :-1, :].addcmul_(X[:, 1:, None], pt)  # += d^-t X_{k+1}
    else:
        X = torch.cumsum(local[:, :, -1] * ak, dim=-1)  # [R, n]
        local[:, 1:, :].addcmul_(X[:, :-1, None], pt)  # += d^(t+1) X_{k-1}
    return local.view(R, n * C)[:, :T], X


def _zero_padding(z: torch.Tensor, lens) -> None:
    """Zero ``z[r, lens[r]:]`` in place for a contiguous ``z`` ``[R, T]`` (``lens`` a list of ints):
    one ``split`` of the flat view into valid and padded pieces, then one ``_foreach_zero_`` over
    the padded pieces (one call, not one per row)."""
    R, T = z.shape
    sizes = []
    for n in lens:
        sizes += (n, T - n)
    pieces = z.view(-1).split(sizes)  # 2R views: row r's valid part, then its padding
    torch._foreach_zero_(pieces[1::2])  # R views, some empty


def _recent_padded(x: torch.Tensor, lens: Optional[torch.Tensor], mask_u8: Optional[torch.Tensor],
                   sched: Schedule, transpose: bool, lens_list: Optional[list] = None) -> Optional[torch.Tensor]:
    """The ``recent`` trace without a floor (normalised or not) of rows whose valid tokens are a
    prefix of length ``lens`` (``None``: all valid; ``mask_u8`` its 0/1 bytes; ``lens_list`` the
    lengths as Python ints when at hand): one chunked scan
    (:func:`_padded_scan`, else :func:`_scan`) and the zeroing of the padding, no other pass over
    ``[R, T]`` for a few hundred rows.

    Forward, the scan is causal: the padding reaches only padded outputs, which are zeroed.
    Backward (``transpose``) the scan never reads padding into a valid position.
    Returns ``None`` when some input (valid, or padding that was read) is NaN or inf, which the
    scan's carries reveal at no extra cost; the caller then takes the general path.
    """
    R, T = x.shape
    d = sched.d
    inv = sched.inv_row_sums(T, x.dtype, x.device) if sched.normalize else None  # [T] 1 / N_t
    # few long rows: the scans take lens and the padding is zeroed row by row; else a float mask
    # (the scans keep the padding out by lens only for T > CHUNK and 0 < d < 1)
    loop = (lens is not None and R <= ROW_LOOP_MAX and T >= max(ROW_LOOP_MIN_T, CHUNK + 1)
            and 0.0 < d < 1.0)
    mf = None if lens is None or loop else mask_u8.to(x.dtype)  # [R, T] float 0/1 (uint8 products cast slowly)
    y = x  # [R, T]
    if transpose:
        if mf is not None:
            y = x * mf
        if inv is not None:
            y = y * inv if y is x else y.mul_(inv)
    scan_lens = lens if (transpose and loop) else None
    res = _padded_scan(y, scan_lens, d, transpose)
    if res is None:
        res = _scan(y, d, transpose, scan_lens)
    z, probe = res
    z = z.contiguous()  # [R, T]
    if not math.isfinite(float(probe.sum())):  # one reduction, one host sync
        return None
    if inv is not None and not transpose:
        z.mul_(inv)
    if loop:
        _zero_padding(z, lens.tolist() if lens_list is None else lens_list)
    elif mf is not None:  # (d = 1 reverse sums leave rounding residue at padding)
        z.mul_(mf)
    return z


def _recent_runs(x: torch.Tensor, mask_u8: torch.Tensor, d: float, transpose: bool) -> Optional[torch.Tensor]:
    """The ``recent`` trace (no floor, not normalised, ``0 < d < 1``) under any 0/1 mask, without
    moving tokens: chunks of ``CHUNK`` tokens that are all valid take the constant-matrix scan,
    all-masked chunks output 0 and pass the carry on undecayed, and only the chunks where a run of
    valid tokens starts or ends (few for masks made of runs) are computed token by token.

    With ``c_t`` the valid tokens at positions ``<= t``, ``V_k`` those up to the end of chunk
    ``k`` (``P_k = V_{k-1}``) and ``cnt_k`` those inside it, the carries are, forward, the trace at
    each chunk's end ``s_k = d^cnt_k s_{k-1} + e_k = d^V_k cumsum(d^-V e)_k``, and backward the
    suffix value ``s_k = sum_{t in chunks >= k} d^(c_t - P_k - 1) y_t = d^-P_k rcumsum(d^P e)_k``
    (float64; ``None`` when ``d^-V`` could leave its range, or when a valid input is NaN/inf: the
    caller then takes the general path). Masked inputs are never read into any output.
    """
    R, T = x.shape
    C = 16  # two 8-byte mask words per chunk
    if not (1e-6 <= d < 1.0) or T < C:
        return None
    n = -(-T // C)
    if n * C != T:  # pad to whole chunks (masked)
        x = torch.nn.functional.pad(x, (0, n * C - T))
        mask_u8 = torch.nn.functional.pad(mask_u8, (0, n * C - T))
    elif not mask_u8.is_contiguous() or mask_u8.storage_offset() % 8 != 0:
        mask_u8 = mask_u8.clone(memory_format=torch.contiguous_format)  # offset 0: readable as words
    x = x.contiguous()
    dt, dev = x.dtype, x.device
    f64 = torch.float64
    mw = mask_u8.view(torch.int64).view(R, n, 2)  # [R, n, 2] the two 8-byte words of each chunk (C = 16)
    full = (mw[:, :, 0] & mw[:, :, 1]) == _ONES8  # [R, n] every byte 1 (the bytes are 0/1)
    empty = (mw[:, :, 0] | mw[:, :, 1]) == 0  # [R, n] no valid token
    mixed = ~(full | empty)  # [R, n] computed token by token
    cnt = full.to(f64) * C  # [R, n] valid tokens per chunk (mixed ones filled in below)
    flat_mixed = mixed.view(-1).nonzero().squeeze(1)  # [K] chunk ids in R * n
    K = flat_mixed.numel()
    ln_d = math.log(d)
    if K:  # the mixed chunks, token by token, in the compute dtype: exponents stay <= C, and an
        # overflow (|x| near float32's max over d^C) makes the carries non-finite: general path
        xm = x.view(R * n, C).index_select(0, flat_mixed)  # [K, C]
        valid = mask_u8.view(R * n, C).index_select(0, flat_mixed) != 0  # [K, C]
        kc = torch.cumsum(valid.to(dt), dim=-1)  # [K, C] inclusive count inside the chunk
        Km = kc[:, -1]  # [K]
        cnt.view(-1).index_copy_(0, flat_mixed, Km.to(f64))
        xm = torch.where(valid, xm, torch.zeros((), dtype=dt, device=dev))  # [K, C] masked inputs never read
        dk = torch.exp(kc * ln_d)  # [K, C] d^kc
        dk_inv = torch.exp(kc * -ln_d)  # [K, C] d^-kc
    V = torch.cumsum(cnt, dim=-1)  # [R, n] valid tokens up to each chunk's end
    if float(V[:, -1].max()) * -ln_d > CARRY_MAX_EXP:
        return None
    local = x.view(R, n, C) @ _decay_matrix(d, C, dt, dev, transpose)  # [R, n, C] exact in full chunks
    zero = torch.zeros((), dtype=f64, device=dev)
    e = torch.where(full, local[:, :, 0 if transpose else -1].to(f64), zero)  # [R, n] chunk contributions
    if K:
        if transpose:  # local_j = d^-kc_j rcumsum(d^kc m y)_j; e = d^-1 rcumsum(...)_0
            rcs = torch.cumsum((xm * dk).flip(-1), dim=-1).flip(-1)  # [K, C]
            e.view(-1).index_copy_(0, flat_mixed, rcs[:, 0].to(f64) / d)
        else:  # local_i = d^kc_i cumsum(d^-kc m x)_i; e = d^K cumsum(...)_end
            cs = torch.cumsum(xm * dk_inv, dim=-1)  # [K, C]
            e.view(-1).index_copy_(0, flat_mixed, (cs[:, -1] * dk[:, -1]).to(f64))
    if transpose:
        P = V - cnt  # [R, n] valid tokens before each chunk
        dP = torch.exp(P * ln_d)  # [R, n]
        s = torch.cumsum((e * dP).flip(-1), dim=-1).flip(-1).div_(dP)  # [R, n] suffix value at chunk k
    else:
        dV = torch.exp(V * ln_d)  # [R, n]
        s = torch.cumsum(e / dV, dim=-1).mul_(dV)  # [R, n] trace at chunk k's end
    if not bool(torch.isfinite(s.sum())):
        return None
    shifted = torch.zeros(R, n, 1, dtype=dt, device=dev)  # [R, n, 1] carry entering each chunk
    if transpose:
        shifted[:, :-1, 0] = s[:, 1:]
    else:
        shifted[:, 1:, 0] = s[:, :-1]
    local.baddbmm_(shifted, _carry_powers(d, C, dt, dev, transpose).expand(R, 1, C))  # full chunks done
    z = local.view(R * n, C)
    flat_empty = empty.view(-1).nonzero().squeeze(1)  # [E]
    if flat_empty.numel():
        z.index_fill_(0, flat_empty, 0.0)
    if K:
        sk = shifted.view(-1).index_select(0, flat_mixed)  # [K] carry entering each mixed chunk
        if transpose:  # g_j = m_j d^-kc_j (rcs_j + d^(K+1) s_{k+1})
            zm = (rcs + (dk[:, -1] * d * sk)[:, None]).mul_(dk_inv)  # [K, C]
        else:  # z_i = m_i d^kc_i (cs_i + s_{k-1})
            zm = (cs + sk[:, None]).mul_(dk)  # [K, C]
        z.index_copy_(0, flat_mixed, torch.where(valid, zm, torch.zeros((), dtype=dt, device=dev)))
    return local.view(R, n * C)[:, :T]


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               sched: Schedule, transpose: bool) -> torch.Tensor:
    """See :mod:`creditlib.ops.trace` for the calling convention."""
    if cu_seqlens is not None:  # packed -> padded [S, Tmax] (the compiled kernels work in place)
        xp, mask, _ = varlen_to_padded(x, cu_seqlens)  # [S, Tmax], [S, Tmax]
        if xp.numel() == 0:
            return torch.zeros_like(x)
        zp = trace_scan(xp.contiguous(), mask.view(torch.uint8), None, sched, transpose)
        return zp[mask]  # [N]
    out_dtype = x.dtype
    cd = _compute_dtype(x.dtype)
    R, T = x.shape
    if x.numel() == 0:
        return torch.zeros_like(x)
    # Any nonzero byte is a valid token (a uint8 tensor viewed as bool may hold 2 or 255).
    if sched.sequence:
        return _sequence(x, None if mask_u8 is None else mask_u8 != 0, cd)
    lens = None if mask_u8 is None else _right_padded(mask_u8)  # [R] when right padded (0/1 bytes)
    lens_list = None  # the same as Python ints, for a few rows (the row-by-row zeroing)
    if lens is not None:
        lens_list = lens.tolist() if R <= ROW_LOOP_MAX else None
        if (min(lens_list) == T) if lens_list is not None else bool((lens == T).all()):
            mask_u8, lens, lens_list = None, None, None  # all valid
    elif mask_u8 is not None and lens is None and bool(mask_u8.all()):
        mask_u8 = None  # all valid, with bytes other than 1
    if lens is None and mask_u8 is not None:
        if _odd_bytes(mask_u8):
            # bytes other than 0/1 (a uint8 tensor viewed as bool): canonicalise once, so that every
            # path below sees 0/1 and a mask takes the same path whatever its bytes
            mask_u8 = (mask_u8 != 0).view(torch.uint8)  # [R, T]
            lens = _right_padded(mask_u8)
        if lens is None and sched.kind == "recent" and sched.window is None and not sched.normalize:
            z = _recent_runs(x.to(cd), mask_u8, sched.d, transpose)  # any mask: no compaction
            if z is not None:  # None: not applicable, or a NaN/inf input
                return z.contiguous().to(out_dtype)
    padded = mask_u8 is None or lens is not None
    if padded and sched.kind == "recent" and sched.window is None:
        z = _recent_padded(x.to(cd), lens, mask_u8, sched, transpose, lens_list)  # None: some input is NaN/inf
        if z is not None:
            return z.to(out_dtype)
    if mask_u8 is None:
        return _rows_nonfinite(x.to(cd), sched, transpose).to(out_dtype)
    if padded and bool(torch.isfinite(x.sum())):
        # right padding (valid tokens form a prefix): positions already count valid tokens, and
        # with finite inputs a 0/1 float mask multiplies padding to exact zeros (no bool `where`).
        # A finite sum proves every input finite (NaN or inf anywhere makes it NaN or inf; an
        # overflow only sends us to the general path below).
        mf = mask_u8.to(cd)  # [R, T]
        return _rows(x.to(cd) * mf, sched, transpose).mul_(mf).to(out_dtype)
    m01 = (mask_u8 != 0).view(torch.uint8)  # [R, T] exactly 0/1
    # Compaction without any bool `where` (slow on CPU): valid token k of a row goes to column
    # k+1 of a [R, T+1] buffer, masked tokens (NaN/inf included) all go to the dump column 0.
    dst = torch.cumsum(m01, dim=-1, dtype=torch.int32).mul_(m01).long()  # [R, T]
    # dst: 1 + valid-token index, 0 when masked
    buf = torch.zeros(R, T + 1, dtype=cd, device=x.device).scatter_(1, dst, x.to(cd))  # [R, T+1]
    zc = _rows_nonfinite(buf[:, 1:].contiguous(), sched, transpose)  # [R, T] rows hold their valid tokens first
    zb = torch.nn.functional.pad(zc, (1, 0))  # [R, T+1], column 0 = 0
    return zb.gather(1, dst).to(out_dtype)  # [R, T]: masked positions read the 0 column
