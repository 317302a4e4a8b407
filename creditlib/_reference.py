"""Plain definitions of the trace (dense, O(T^2)): the ground truth the fast paths are held to.

Not for production use beyond a few thousand tokens: ``trace_weights(65536)`` is 34 GB.
"""

from __future__ import annotations

import torch

from .style import DecayStyle


def trace_weights(T: int, style: DecayStyle, *, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Dense weight matrix ``W[t, j] = w(t, j)`` of one fully valid sequence of length ``T``.

    ``z = W @ x`` is the traced log-ratio (backward view) and ``W.T @ a`` the per-token credit
    (forward view). Computed in float64 (powers of ``d`` are never rounded to float32).
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 0:
        raise ValueError(f"T must be a non-negative int, got {T!r}")
    if not isinstance(style, DecayStyle):
        raise ValueError(f"style must be a creditlib.DecayStyle, got {type(style).__name__}")
    d = torch.tensor(style.decay, dtype=torch.float64, device=device)
    t = torch.arange(T, dtype=torch.float64, device=device)[:, None]  # [T, 1]
    j = torch.arange(T, dtype=torch.float64, device=device)[None, :]  # [1, T]
    lag = (t - j).clamp_min(0)  # [T, T]
    w = torch.pow(d, lag)  # [T, T]; pow(0, 0) = 1
    if style.both:
        w = torch.maximum(w, torch.pow(d, j).expand_as(w))  # [T, T]
    if style.eps > 0:
        w = w.clamp_min(style.eps)
    w = torch.tril(w)  # w(t, j) = 0 for j > t
    return w.to(dtype)


def _dense_per_row(mask: torch.Tensor, style: DecayStyle) -> torch.Tensor:
    """[R, T] bool mask -> [R, T, T] float64 weights over array positions (valid-token counting)."""
    R, T = mask.shape
    W = trace_weights(T, style, device=mask.device)  # [T, T]
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # [R, T] valid-token index
    Wr = W[pos[:, :, None], pos[:, None, :]]  # [R, T, T]
    valid = mask[:, :, None] & mask[:, None, :]  # [R, T, T]
    return torch.where(valid, Wr, torch.zeros((), dtype=Wr.dtype, device=Wr.device))


def eligibility_trace_naive(x: torch.Tensor, mask: torch.Tensor, style: DecayStyle,
                            *, transpose: bool = False) -> torch.Tensor:
    """``z_t = sum_{j<=t} w(t, j) x_j`` over valid tokens, by a dense matmul in float64.

    ``x``: float ``[..., T]``; ``mask``: bool ``[..., T]``. ``transpose=True`` applies ``W^T``
    (the forward-view credit / the backward pass). Masked outputs are 0, masked inputs ignored.
    """
    shape = x.shape
    T = shape[-1]
    x2 = x.reshape(-1, T)  # [R, T]
    m2 = mask.reshape(-1, T)  # [R, T]
    W = _dense_per_row(m2, style)  # [R, T, T]
    if transpose:
        W = W.transpose(1, 2)
    x64 = torch.where(m2, x2.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))  # [R, T]
    z = torch.bmm(W, x64[:, :, None])[:, :, 0]  # [R, T]
    return z.to(x.dtype).reshape(shape)
