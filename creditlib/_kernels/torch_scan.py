"""Pure-PyTorch O(T) eligibility trace: the fallback when no compiled kernel is available.

Plan (all O(T) time and memory, no T x T matrix, no Python loop over time steps, no ``d**-t``):

1. **Compaction.** Move each row's valid tokens to the front (one scatter; skipped when the mask
   is all-valid or right-padded). Valid-token positions then equal array positions and every
   style becomes index arithmetic that is the same for all rows.
2. **Recent trace** ``r_t = d r_{t-1} + x_t`` by a chunked matmul: each chunk of ``C`` tokens is
   multiplied by the constant ``C x C`` matrix ``d**(i-k)`` (lower triangular), and the chunk
   carries form the same recurrence with decay ``d**C`` on a sequence ``C`` times shorter, solved
   recursively. Powers of ``d`` are computed in float64, then cast.
3. **Other styles** from ``r``, the plain prefix sum ``P`` and the early prefix sum
   ``S_m = sum_{j<=m} d**j x_j``. With window start ``a_t`` and early end ``b_t``
   (see ``docs/trace.md``)::

       z_t = (r_t - d**(t-a_t+1) r_{a_t-1}) + S_{b_t} + eps (P_{a_t-1} - P_{b_t})

   The transpose (backward pass, forward-view credit) is the mirror image with suffix sums.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import varlen_to_padded

CHUNK = 32  # chunk length of the matmul scan


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _decay_matrix(d: float, C: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``M[k, i] = d**(i - k)`` for ``k <= i`` else 0, so that ``x_chunk @ M`` is the local scan."""
    i = torch.arange(C, dtype=torch.float64, device=device)
    lag = i[None, :] - i[:, None]  # [C, C] (k, i) -> i - k
    M = torch.where(lag >= 0, torch.pow(torch.tensor(d, dtype=torch.float64, device=device), lag.clamp_min(0)),
                    torch.zeros((), dtype=torch.float64, device=device))  # [C, C]
    return M.to(dtype)


def recent_scan(x: torch.Tensor, d: float, reverse: bool = False) -> torch.Tensor:
    """``r_t = d r_{t-1} + x_t`` along the last dim of ``x`` ``[R, T]`` (no mask).

    ``reverse=True`` gives the suffix form ``u_t = d u_{t+1} + x_t`` (the transpose), without flips.
    """
    R, T = x.shape
    if d == 0.0 or T <= 1:
        return x.clone()
    if d == 1.0:
        if reverse:
            tot = x.sum(dim=-1, keepdim=True)  # [R, 1]
            return tot - torch.cumsum(x, dim=-1) + x
        return torch.cumsum(x, dim=-1)
    C = CHUNK
    if T <= C:
        M = _decay_matrix(d, T, x.dtype, x.device)  # [T, T]
        return x @ (M.T if reverse else M)
    n = -(-T // C)  # chunks
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, n * C - T))  # [R, n*C] zeros at the end change nothing
    xc = x.view(R, n, C)  # [R, n, C]
    M = _decay_matrix(d, C, x.dtype, x.device)  # [C, C]
    local = xc @ (M.T if reverse else M)  # [R, n, C] scan inside each chunk
    i = torch.arange(C, dtype=torch.float64, device=x.device)  # [C]
    base = torch.tensor(d, dtype=torch.float64, device=x.device)
    if reverse:
        carry = recent_scan(local[:, :, 0].contiguous(), d ** C, reverse=True)  # [R, n] value at chunk starts
        pw = torch.pow(base, C - i).to(x.dtype)  # [C] d^(C-i)
        local[:, :-1, :] += carry[:, 1:, None] * pw  # suffix from the next chunk
    else:
        carry = recent_scan(local[:, :, -1].contiguous(), d ** C)  # [R, n] value at chunk ends
        pw = torch.pow(base, i + 1).to(x.dtype)  # [C] d^(i+1)
        local[:, 1:, :] += carry[:, :-1, None] * pw  # carry from the previous chunk
    return local.view(R, n * C)[:, :T]


def _pow(d: float, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d**k`` for an integer tensor ``k >= 0``, computed in float64 (``0**0 = 1``)."""
    base = torch.tensor(d, dtype=torch.float64, device=k.device)
    return torch.pow(base, k.to(torch.float64)).to(dtype)


def _window(d: float, eps: float) -> Optional[int]:
    from ..style import DecayStyle

    return DecayStyle("recent", 1.0, d, eps).window


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


def _forward_dense_rows(x: torch.Tensor, d: float, eps: float, both: bool) -> torch.Tensor:
    """Trace of rows whose valid tokens are a prefix (zeros after). ``x`` ``[R, T]``.

    Window start ``a_t`` and early end ``b_t`` per style (``L`` = :attr:`DecayStyle.window`):
    recent ``a = max(0, t-L)``, ``b = -1``; both ``a = max(t//2+1, t-L)``, ``b = min(t//2, L)``.
    """
    R, T = x.shape
    L = _window(d, eps)
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


def _transpose_dense_rows(y: torch.Tensor, d: float, eps: float, both: bool) -> torch.Tensor:
    """``W^T y`` for rows whose valid tokens are a prefix (zeros after). ``y`` ``[R, T]``.

    ``g_j = sum_{t>=j} w(t, j) y_t``. With ``u`` the reverse recent trace and ``Q`` suffix sums:
    recent+floor ``g_j = u_j - d^(L+1) u_{j+L+1} + eps Q_{j+L+1}``; both (``j <= L``)
    ``g_j = u_j + d^j (Q_{2j} - u_{2j})``, (``j > L``) as recent+floor.
    """
    R, T = y.shape
    L = _window(d, eps)
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


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               d: float, eps: float, both: bool, transpose: bool) -> torch.Tensor:
    """See :mod:`creditlib._kernels` for the calling convention."""
    if cu_seqlens is not None:  # packed -> padded [S, Tmax] (the compiled kernels work in place)
        xp, mask, _ = varlen_to_padded(x, cu_seqlens)  # [S, Tmax], [S, Tmax]
        if xp.numel() == 0:
            return torch.zeros_like(x)
        zp = trace_scan(xp.contiguous(), mask.view(torch.uint8), None, d, eps, both, transpose)
        return zp[mask]  # [N]
    out_dtype = x.dtype
    cd = _compute_dtype(x.dtype)
    R, T = x.shape
    op = _transpose_dense_rows if transpose else _forward_dense_rows
    if mask_u8 is None or bool(mask_u8.all()):
        return op(x.to(cd), d, eps, both).to(out_dtype)
    if bool(torch.isfinite(x.sum())) and (T == 1 or not bool((mask_u8[:, 1:] > mask_u8[:, :-1]).any())):
        # right padding (valid tokens form a prefix): positions already count valid tokens, and
        # with finite inputs a float mask multiplies padding to exact zeros (no bool `where`).
        # A finite sum proves every input finite (NaN or inf anywhere makes it NaN or inf; an
        # overflow only sends us to the general path below).
        mf = mask_u8.to(cd)  # [R, T]
        return op(x.to(cd) * mf, d, eps, both).mul_(mf).to(out_dtype)
    # Compaction without any bool `where` (slow on CPU): valid token k of a row goes to column
    # k+1 of a [R, T+1] buffer, masked tokens (NaN/inf included) all go to the dump column 0.
    dst = torch.cumsum(mask_u8, dim=-1, dtype=torch.int32).mul_(mask_u8).long()  # [R, T]
    # dst: 1 + valid-token index, 0 when masked
    buf = torch.zeros(R, T + 1, dtype=cd, device=x.device).scatter_(1, dst, x.to(cd))  # [R, T+1]
    zc = op(buf[:, 1:].contiguous(), d, eps, both)  # [R, T] rows hold their valid tokens first
    zb = torch.nn.functional.pad(zc, (1, 0))  # [R, T+1], column 0 = 0
    return zb.gather(1, dst).to(out_dtype)  # [R, T]: masked positions read the 0 column
