"""creditlib.functional: the eligibility trace of GRPO-lambda and the group-relative advantage.

Public names (fixed by the design contract)::

    W = trace_weights(T, style)                    # dense [T, T] float64 reference
    z = eligibility_trace(x, mask, style)          # x: [..., T] float; mask: [..., T] bool
    z = eligibility_trace_varlen(x, cu_seqlens, style)   # packed x: [N]; cu_seqlens: int [S+1]
    c = traced_credit(adv, mask, style)            # forward view: adv [...] or [..., T] -> [..., T]
    a = group_advantage(rewards, group_size, scale="std", baseline="mean")   # [B] -> [B]

Every trace op is O(T) in time and memory in the forward and the backward pass. The work is done
by one of several backends (see ``creditlib._kernels``): a fused C++ CPU kernel compiled at first
use, a Triton kernel on CUDA, and a pure-PyTorch blocked scan that needs no compiler. All give the
same numbers; ``backend=`` picks one explicitly.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _kernels
from ._reference import eligibility_trace_naive, trace_weights
from .style import DecayStyle

__all__ = [
    "DecayStyle",
    "trace_weights",
    "eligibility_trace",
    "eligibility_trace_varlen",
    "traced_credit",
    "group_advantage",
    "eligibility_trace_naive",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_style(style) -> DecayStyle:
    if not isinstance(style, DecayStyle):
        raise ValueError(
            f"style must be a creditlib.DecayStyle (e.g. DecayStyle('recent', lam=0.99)), "
            f"got {type(style).__name__}")
    return style


def _check_float(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def _check_mask(mask, like: torch.Tensor, like_name: str = "x") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid token), got dtype {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {like_name} shape {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {like_name} is on {like.device}")
    return mask


# ----------------------------------------------------------------------------- the operator
# The trace is one opaque custom op: torch.compile treats it as a single node (no tracing into the
# kernels, no graph breaks), autograd uses the registered backward, and fake tensors get its shape.
@torch.library.custom_op("creditlib::trace_scan", mutates_args=())
def _trace_op(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              d: float, eps: float, both: bool, transpose: bool, backend: str) -> torch.Tensor:
    return _kernels.trace_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose, backend)


@_trace_op.register_fake
def _(x, mask_u8, cu_seqlens, d, eps, both, transpose, backend):
    return torch.empty_like(x)


def _trace_setup(ctx, inputs, output):
    x, mask_u8, cu_seqlens, d, eps, both, transpose, backend = inputs
    ctx.save_for_backward(mask_u8, cu_seqlens)
    ctx.params = (d, eps, both, transpose, backend)


def _trace_backward(ctx, grad_z):
    # z = W x is linear in x: the gradient is the transposed operator, itself this op (so double
    # backward and gradgradcheck work)
    mask_u8, cu_seqlens = ctx.saved_tensors
    d, eps, both, transpose, backend = ctx.params
    grad_x = _trace_op(grad_z.contiguous(), mask_u8, cu_seqlens, d, eps, both, not transpose, backend)
    return grad_x, None, None, None, None, None, None, None


_trace_op.register_autograd(_trace_backward, setup_context=_trace_setup)


def _apply(x2: torch.Tensor, mask_u8: Optional[torch.Tensor], cu: Optional[torch.Tensor],
           style: DecayStyle, transpose: bool, backend: str) -> torch.Tensor:
    _kernels.check_backend(backend)
    return _trace_op(x2, mask_u8, cu, style.decay, style.eps, style.both, transpose, backend)


def _padded(x: torch.Tensor, mask: Optional[torch.Tensor], style: DecayStyle, transpose: bool,
            backend: str) -> torch.Tensor:
    shape = x.shape
    T = shape[-1] if x.dim() > 0 else 1
    x2 = x.reshape(-1, T).contiguous()  # [R, T]
    if mask is None:
        m2 = None
    else:
        # bool -> uint8 as a view (no copy, no conversion pass)
        m2 = mask.reshape(-1, T).contiguous().view(torch.uint8)  # [R, T]
    if x2.numel() == 0:
        return torch.zeros_like(x)
    z2 = _apply(x2, m2, None, style, transpose, backend)  # [R, T]
    return z2.reshape(shape)


# ----------------------------------------------------------------------------- public API
def eligibility_trace(x: torch.Tensor, mask: Optional[torch.Tensor], style: DecayStyle,
                      *, backend: str = "auto") -> torch.Tensor:
    """Traced log-ratio ``z_t = sum_{j<=t} w(t, j) x_j`` over the valid tokens of each row.

    Args:
        x: float ``[..., T]``, per-token log importance ratio ``log pi - log pi_old``.
        mask: bool ``[..., T]`` (True = valid token), or ``None`` for all valid. Any pattern of
            valid runs is allowed; positions count valid tokens only, masked outputs are 0 and
            masked inputs are ignored even when NaN/inf.
        style: a :class:`DecayStyle`.
        backend: ``"auto"`` (fastest available), ``"cpp"``, ``"triton"``, ``"torch"`` or
            ``"reference"`` (dense O(T^2), for tests).

    Returns:
        ``z`` with the shape and dtype of ``x`` (half types accumulate in float32).
    """
    style = _check_style(style)
    x = _check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., T], got a scalar")
    if mask is not None:
        _check_mask(mask, x)
    return _padded(x, mask, style, False, backend)


def eligibility_trace_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, style: DecayStyle,
                             *, backend: str = "auto") -> torch.Tensor:
    """Eligibility trace over packed sequences (flash-attention's varlen convention).

    Args:
        x: float ``[N]``, the sequences concatenated.
        cu_seqlens: int ``[S+1]``, ``0 = cu[0] <= cu[1] <= ... <= cu[S] = N``; sequence ``s`` is
            ``x[cu[s]:cu[s+1]]`` and its trace restarts at ``cu[s]``.
        style: a :class:`DecayStyle`.
    Returns:
        ``z`` ``[N]``, dtype of ``x``.
    """
    style = _check_style(style)
    x = _check_float("x", x)
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D packed [N] for the varlen form, got shape {tuple(x.shape)}")
    cu = _check_cu_seqlens(cu_seqlens, x)
    if x.numel() == 0:
        return torch.zeros_like(x)
    return _apply(x.contiguous(), None, cu, style, False, backend)


def _check_cu_seqlens(cu_seqlens, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be an int torch.Tensor [S+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [S+1], got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()  # [S+1]
    N = x.shape[0]
    if int(cu[0]) != 0 or int(cu[-1]) != N:
        raise ValueError(f"cu_seqlens must start at 0 and end at len(x) = {N}, got {int(cu[0])} .. {int(cu[-1])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    return cu


def traced_credit(adv: torch.Tensor, mask: Optional[torch.Tensor], style: DecayStyle,
                  *, backend: str = "auto") -> torch.Tensor:
    """Forward view: per-token credit ``C_j = sum_{t>=j} w(t, j) a_t`` (``W^T a``).

    At ratio 1 the gradient of the traced PPO surrogate equals the gradient of the plain
    policy-gradient surrogate with these per-token advantages, so this plugs the trace into any
    trainer that accepts per-token advantages.

    Args:
        adv: float ``[...]`` (one advantage per sequence, broadcast over its valid tokens) or
            ``[..., T]`` (per-token advantages, e.g. already multiplied by aggregation weights).
        mask: bool ``[..., T]``; required when ``adv`` is per-sequence. ``None`` = all valid.
        style: a :class:`DecayStyle`.
    Returns:
        ``[..., T]`` credit, dtype of ``adv``; 0 at masked positions.
    """
    style = _check_style(style)
    adv = _check_float("adv", adv)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            _check_mask(mask, mask if isinstance(mask, torch.Tensor) else adv, "mask")
        if mask.dim() == 0:
            raise ValueError("mask must have at least one dimension [..., T]")
        if adv.shape == mask.shape[:-1]:
            adv = adv.unsqueeze(-1).expand(mask.shape)  # [..., T]
        elif adv.shape == mask.shape[:-1] + (1,):
            adv = adv.expand(mask.shape)  # [..., T]
        _check_mask(mask, adv, "adv (per-token) / adv[..., None] (per-sequence)")
    elif adv.dim() == 0:
        raise ValueError("adv must be per-token [..., T] when mask is None")
    return _padded(adv, mask, style, True, backend)


def group_advantage(rewards: torch.Tensor, group_size: Optional[int] = None, scale: str = "std",
                    baseline: str = "mean", *, group_ids: Optional[torch.Tensor] = None,
                    eps: float = 1e-4) -> torch.Tensor:
    """Critic-free TD error: the group-relative advantage of each completion.

    ``A_i = (R_i - b_i) / (std_G(R) + eps)`` with ``b_i`` the group mean (``baseline="mean"``,
    GRPO) or the mean of the other members (``"loo"``, RLOO); ``scale="none"`` skips the division
    (Dr. GRPO). ``std`` is the unbiased sample std of the group, taken as 0 for groups of one, so
    groups of size one and groups with identical rewards get advantage 0, never NaN.

    Args:
        rewards: float ``[B]``.
        group_size: ``G``: completions ``[k*G, (k+1)*G)`` share a prompt. Must divide ``B``.
        group_ids: int ``[B]`` instead of ``group_size``: completions with equal ids form a group
            (any order, any group sizes).
    Returns:
        advantages ``[B]``, dtype of ``rewards``.
    """
    rewards = _check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    B = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size or group_ids")
    r = rewards.to(torch.float64)  # [B]
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide the batch size {B}")
        gid = torch.arange(B, device=r.device) // group_size  # [B]
    else:
        if not isinstance(group_ids, torch.Tensor) or group_ids.shape != (B,) or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an int tensor of shape ({B},), got "
                             f"{getattr(group_ids, 'dtype', type(group_ids).__name__)} "
                             f"{tuple(getattr(group_ids, 'shape', ()))}")
        gid = torch.unique(group_ids.to(r.device), return_inverse=True)[1]  # [B] in 0..n-1
    n_groups = int(gid.max()) + 1 if B else 0
    cnt = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, gid, torch.ones_like(r))  # [n]
    tot = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, gid, r)  # [n]
    mean = (tot / cnt)[gid]  # [B]
    sq = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, gid, (r - mean) ** 2)  # [n]
    n = cnt[gid]  # [B]
    std = torch.where(n > 1, (sq[gid] / (n - 1).clamp_min(1)).sqrt(), torch.zeros_like(r))  # [B]
    if baseline == "mean":
        base = mean
    else:
        base = torch.where(n > 1, (tot[gid] - r) / (n - 1).clamp_min(1), r)  # [B] leave-one-out mean
    adv = r - base  # [B]
    if scale == "std":
        den = std + eps  # [B]
        adv = torch.where(den > 0, adv / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(adv))
    return adv.to(rewards.dtype)
