"""Plain definitions of the trace (dense, O(T^2)): the ground truth the fast paths are held to.

Not for production use beyond a few thousand tokens: ``trace_weights(65536)`` is 34 GB.
"""

from __future__ import annotations

import torch

from ...style import DecayStyle


def _check_style(style) -> DecayStyle:
    if not isinstance(style, DecayStyle):
        raise ValueError(f"style must be a creditlib.DecayStyle, got {type(style).__name__}")
    return style


def _raw_weights(T: int, style: DecayStyle, device=None) -> torch.Tensor:
    """Un-normalised ``w(t, j)`` of ``"recent"`` / ``"both"``, float64 ``[T, T]``."""
    d = torch.tensor(style.decay, dtype=torch.float64, device=device)
    t = torch.arange(T, dtype=torch.float64, device=device)[:, None]  # [T, 1]
    j = torch.arange(T, dtype=torch.float64, device=device)[None, :]  # [1, T]
    lag = (t - j).clamp_min(0)  # [T, T]
    w = torch.pow(d, lag)  # [T, T]; pow(0, 0) = 1
    if style.both:
        w = torch.maximum(w, torch.pow(d, j).expand_as(w))  # [T, T]
    if style.eps > 0:
        w = w.clamp_min(style.eps)
    return torch.tril(w)  # [T, T] w(t, j) = 0 for j > t


def trace_weights(T: int, style: DecayStyle, *, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Dense weight matrix ``W[t, j] = w(t, j)`` of one fully valid sequence of length ``T``.

    ``z = W @ x`` is the traced log-ratio (backward view) and ``W.T @ a`` the per-token credit
    (forward view). Computed in float64 (powers of ``d`` are never rounded to float32).
    ``normalize=True`` divides each row by its sum; ``"sequence"`` is ``1/T`` everywhere.
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 0:
        raise ValueError(f"T must be a non-negative int, got {T!r}")
    style = _check_style(style)
    if style.sequence:
        return torch.full((T, T), 1.0 / max(T, 1), dtype=torch.float64, device=device).to(dtype)  # [T, T]
    w = _raw_weights(T, style, device)  # [T, T]
    if style.normalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(1.0)  # [T, T] row sums are >= 1 (w(t, t) = 1)
    return w.to(dtype)


def trace_support(T: int, style: DecayStyle, device=None) -> torch.Tensor:
    """bool ``[T, T]``: where ``w(t, j) != 0`` as a real number (before any float underflow).

    ``j <= t`` and (``d > 0``, or a floor ``eps > 0``, or ``j == t``, or ``"both"`` and ``j == 0``);
    every entry for ``"sequence"``. A non-finite valid input reaches exactly these outputs.
    """
    style = _check_style(style)
    if style.sequence:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    t = torch.arange(T, device=device)[:, None]  # [T, 1]
    j = torch.arange(T, device=device)[None, :]  # [1, T]
    if style.decay > 0 or style.eps > 0:
        return (j <= t).expand(T, T).clone()
    s = j == t  # [T, T]
    if style.both:
        s = s | (j == 0)
    return s


def _dense_per_row(mask: torch.Tensor, style: DecayStyle):
    """[R, T] bool mask -> ([R, T, T] float64 weights, [R, T, T] bool support) over array
    positions (valid-token counting; the sequence style's ``1/n`` uses each row's own ``n``)."""
    R, T = mask.shape
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # [R, T] valid-token index
    valid = mask[:, :, None] & mask[:, None, :]  # [R, T, T]
    S = trace_support(T, style, device=mask.device)  # [T, T]
    Sr = S[pos[:, :, None], pos[:, None, :]] & valid  # [R, T, T]
    if style.sequence:
        n = mask.sum(-1).clamp_min(1).to(torch.float64)  # [R]
        Wr = (1.0 / n)[:, None, None].expand(R, T, T)  # [R, T, T]
    else:
        W = trace_weights(T, style, device=mask.device)  # [T, T]
        Wr = W[pos[:, :, None], pos[:, None, :]]  # [R, T, T]
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    return torch.where(Sr, Wr, zero), Sr


def eligibility_trace_naive(x: torch.Tensor, mask: torch.Tensor, style: DecayStyle,
                            *, transpose: bool = False) -> torch.Tensor:
    """``z_t = sum_{j<=t} w(t, j) x_j`` over valid tokens, by dense products in float64.

    ``x``: float ``[..., T]``; ``mask``: bool ``[..., T]`` (any nonzero byte is valid).
    ``transpose=True`` applies ``W^T`` (the forward-view credit / the backward pass). Masked
    outputs are 0 and masked inputs ignored. A NaN/inf at a valid input reaches exactly the outputs
    whose weight includes it (:func:`trace_support`), also where that weight underflows to 0; the
    weights are positive, so an output reached only by ``-inf`` inputs is ``-inf`` (only by
    ``+inf``: ``+inf``), one reached by a NaN or by both signs is NaN, and every other output is
    the finite sum of its finite inputs.
    """
    style = _check_style(style)
    shape = x.shape
    T = shape[-1]
    x2 = x.reshape(-1, T)  # [R, T]
    m2 = mask.reshape(-1, T)  # [R, T]
    if m2.dtype == torch.bool:
        m2 = m2.view(torch.uint8)
    m2 = m2 != 0  # [R, T] bytes other than 0/1 count as valid
    W, S = _dense_per_row(m2, style)  # [R, T, T] each
    if transpose:
        W, S = W.transpose(1, 2), S.transpose(1, 2)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    x64 = torch.where(m2, x2.to(torch.float64), zero)  # [R, T]
    finite = torch.isfinite(x64)  # [R, T]
    z = torch.bmm(W, torch.where(finite, x64, zero)[:, :, None])[:, :, 0]  # [R, T] the finite part
    if not bool(finite.all()):
        # non-finite inputs enter each output whose support holds them (w > 0 as a real number,
        # even where it underflowed): w * (+-inf) = +-inf, and inf - inf or any NaN gives NaN
        def reaches(sel):  # [R, T] bool inputs -> [R, T] bool outputs they reach
            return (S & sel[:, None, :]).any(-1)

        pos, neg = reaches(x64 == float("inf")), reaches(x64 == float("-inf"))  # [R, T] each
        nan = reaches(torch.isnan(x64)) | (pos & neg)  # [R, T]
        z = torch.where(pos, float("inf"), torch.where(neg, float("-inf"), z))  # [R, T]
        z = torch.where(nan, float("nan"), z)
    return z.to(x.dtype).reshape(shape)
