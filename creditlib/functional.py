"""creditlib.functional: the eligibility trace of GRPO-lambda and the group-relative advantage.

Public names (fixed by the design contract)::

    W = trace_weights(T, style)                    # dense [T, T] float64 reference
    z = eligibility_trace(x, mask, style)          # x: [..., T] float; mask: [..., T] bool
    z = eligibility_trace_varlen(x, cu_seqlens, style)   # packed x: [N]; cu_seqlens: int [S+1]
    c = traced_credit(adv, mask, style)            # forward view: adv [...] or [..., T] -> [..., T]
    a = group_advantage(rewards, group_size, scale="std", baseline="mean")   # [B] -> [B]
    d = prefix_td(tokens, mask, rewards, group_size)   # per-token prefix-tree TD error [B, T]
    k = entropy_mask(entropy, mask, quantile=0.2)      # bool [B, T]

Multi-turn trajectories (one row each; its turns the runs of valid tokens, or given ``turn_ids``)::

    ids = turn_ids_from_mask(mask, boundary=None)      # int64 [B, T]: turn of each valid token, -1 elsewhere
    e = turn_ends(ids)                                 # bool [B, T]: the last valid token of each turn
    G = turn_returns(ids, turn_rewards, rewards, gamma=1.0)   # [B, K] discounted return of each turn
    a = turn_credit("turn-index", ids, turn_rewards, rewards, group_size)   # [B, T] (or [B, K]: per_turn=True)
    p = implicit_process_rewards(log_ratio, ids, beta=1.0)   # [B, K]: PRIME's beta * sum of a step's log-ratios

``turn_credit`` kinds: ``"turn-grpo"``, ``"turn-index"``, ``"anchor-state"`` (GiGPO) and
``"prefix-turn"``; every token of turn ``k`` gets ``A[i, k]``, masked tokens 0; every baseline is
leave-one-out. See :mod:`creditlib.ops.turns.vectorised` for the definitions.

Options are keyword-only (``scale=``, ``baseline=``, ``eps=``, ``backend=``, ...); a mask is a
bool tensor or an integer 0/1 tensor (nonzero = valid, as ``mask.bool()``: Hugging Face and TRL
masks are ``int64``), a float mask is refused (see :mod:`creditlib._validation`).

Every trace op is O(T) in time and memory in the forward and the backward pass, for every
:class:`DecayStyle`: ``"recent"``, ``"both"``, eps floors, row-normalised weights
(``normalize=True``: ``z_t`` is a weighted mean of the earlier log-ratios) and the GSPO
``"sequence"`` style (every valid token carries the row's mean log-ratio). The work is done by one of
several backends (see ``creditlib.ops.trace``): a fused C++ CPU kernel compiled at first use, a
Triton kernel on CUDA, and a pure-PyTorch blocked scan that needs no compiler. All give the same
numbers; ``backend=`` picks one explicitly.

Edge cases, the same on every backend: ``T = 0``, an empty batch and ``N = 0`` packed tokens return
an empty result that keeps the autograd graph; masked inputs are ignored even when NaN/inf; a
NaN/inf at a *valid* token reaches exactly the outputs whose weight includes it (see
``creditlib.ops.trace``); a bool mask whose bytes are not 0/1 (``uint8.view(torch.bool)``) counts
any nonzero byte as a valid token. Validation goes through :mod:`creditlib._validation`.

``torch.compile(fullgraph=True)`` compiles every public function here: the trace, ``prefix_td``
and ``entropy_mask`` are opaque custom ops (one graph node each), ``group_advantage`` is plain
tensor code when the groups are given by ``group_size``. While compiling, the data-dependent
checks (non-finite rewards) are skipped; with ``group_ids`` (``torch.unique``: a shape that
depends on the data) ``group_advantage`` needs a graph break, so ``fullgraph=True`` refuses it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import trace as _trace
from .ops.trace import Schedule
from .ops.trace.naive import eligibility_trace_naive, trace_weights
from .ops.entropy import entropy_mask
from .ops.prefix.vectorised import prefix_td
from .ops.treerl.vectorised import treerl_advantage
from .ops.turns.vectorised import (implicit_process_rewards, turn_credit, turn_ends, turn_ids_from_mask,
                                   turn_returns)
from ._validation import as_bool_mask
from ._validation import check_baseline, check_eps, check_groups, check_scale, check_style, compiling
from ._validation import check_float as _check_float
from ._validation import check_mask as _check_mask
from ._validation import deprecated_alias
from .style import DecayStyle

__all__ = [
    "DecayStyle",
    "trace_weights",
    "eligibility_trace",
    "eligibility_trace_varlen",
    "traced_credit",
    "group_advantage",
    "treerl_advantage",
    "eligibility_trace_naive",
    "prefix_td",
    "entropy_mask",
    "turn_ids_from_mask",
    "turn_ends",
    "turn_returns",
    "turn_credit",
    "implicit_process_rewards",
]


# ----------------------------------------------------------------------------- validation
# (the shared checks live in creditlib._validation; _check_float / _check_mask stay importable here)
_check_style = check_style


# ----------------------------------------------------------------------------- the operator
# The trace is one opaque custom op: torch.compile treats it as a single node (no tracing into the
# kernels, no graph breaks), autograd uses the registered backward, and fake tensors get its shape.
# Its schema takes primitives; the kernels' Schedule is built (and cached) inside.
@torch.library.custom_op("creditlib::trace_scan", mutates_args=())
def _trace_op(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              kind: str, d: float, eps: float, normalize: bool, transpose: bool, backend: str) -> torch.Tensor:
    sched = Schedule.make(kind, d, eps, normalize)
    return _trace.trace_scan(x, mask_u8, cu_seqlens, sched, transpose, backend)


@_trace_op.register_fake
def _(x, mask_u8, cu_seqlens, kind, d, eps, normalize, transpose, backend):
    return torch.empty_like(x)


def _trace_setup(ctx, inputs, output):
    x, mask_u8, cu_seqlens, kind, d, eps, normalize, transpose, backend = inputs
    ctx.save_for_backward(mask_u8, cu_seqlens)
    ctx.params = (kind, d, eps, normalize, transpose, backend)


def _trace_backward(ctx, grad_z):
    # z = W x is linear in x: the gradient is the transposed operator, itself this op (so double
    # backward and gradgradcheck work)
    mask_u8, cu_seqlens = ctx.saved_tensors
    kind, d, eps, normalize, transpose, backend = ctx.params
    grad_x = _trace_op(grad_z.contiguous(), mask_u8, cu_seqlens, kind, d, eps, normalize, not transpose, backend)
    return grad_x, None, None, None, None, None, None, None, None


_trace_op.register_autograd(_trace_backward, setup_context=_trace_setup)


def _apply(x2: torch.Tensor, mask_u8: Optional[torch.Tensor], cu: Optional[torch.Tensor],
           style: DecayStyle, transpose: bool, backend: str) -> torch.Tensor:
    _trace.check_backend(backend)
    # the op carries the style's primitives (validated by DecayStyle); it builds the Schedule inside
    return _trace_op(x2, mask_u8, cu, style.style, style.decay, style.eps, style.normalize, transpose, backend)


def _padded(x: torch.Tensor, mask: Optional[torch.Tensor], style: DecayStyle, transpose: bool,
            backend: str) -> torch.Tensor:
    shape = x.shape
    T = shape[-1] if x.dim() > 0 else 1
    if x.numel() == 0:  # T = 0 or an empty batch: nothing to scan, but keep the autograd graph
        _trace.check_backend(backend)
        return x.clone()
    x2 = x.reshape(-1, T).contiguous()  # [R, T]
    if mask is None:
        m2 = None
    else:
        # bool -> uint8 as a view (no copy, no conversion pass); kernels treat any nonzero byte as valid
        m2 = mask.reshape(-1, T).contiguous().view(torch.uint8)  # [R, T]
    z2 = _apply(x2, m2, None, style, transpose, backend)  # [R, T]
    return z2.reshape(shape)


# ----------------------------------------------------------------------------- public API
def eligibility_trace(x: torch.Tensor, mask: Optional[torch.Tensor], style: DecayStyle,
                      *, backend: str = "auto") -> torch.Tensor:
    """Traced log-ratio ``z_t = sum_{j<=t} w(t, j) x_j`` over the valid tokens of each row.

    Args:
        x: float ``[..., T]``, per-token log importance ratio ``log pi - log pi_old``.
        mask: bool or integer ``[..., T]`` (nonzero = valid token), or ``None`` for all valid. Any pattern of
            valid runs is allowed; positions count valid tokens only, masked outputs are 0 and
            masked inputs are ignored even when NaN/inf.
        style: a :class:`DecayStyle` (any kind, floor, ``normalize``; ``"sequence"`` is not causal:
            each valid token gets the mean of its row's valid ``x``).
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
        mask = _check_mask(mask, x)
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
    if x.numel() == 0:  # N = 0: keep the autograd graph
        _trace.check_backend(backend)
        return x.clone()
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
        mask: bool or integer ``[..., T]`` (nonzero = valid); required when ``adv`` is
            per-sequence. ``None`` = all valid.
        style: a :class:`DecayStyle`.
    Returns:
        ``[..., T]`` credit, dtype of ``adv``; 0 at masked positions.
    """
    style = _check_style(style)
    adv = _check_float("adv", adv)
    if mask is not None:
        mask = as_bool_mask(mask)
        if mask.dim() == 0:
            raise ValueError("mask must have at least one dimension [..., T]")
        if adv.shape == mask.shape[:-1]:
            adv = adv.unsqueeze(-1).expand(mask.shape)  # [..., T]
        elif adv.shape == mask.shape[:-1] + (1,):
            adv = adv.expand(mask.shape)  # [..., T]
        mask = _check_mask(mask, adv, "adv (per-token) / adv[..., None] (per-sequence)")
    elif adv.dim() == 0:
        raise ValueError("adv must be per-token [..., T] when mask is None")
    return _padded(adv, mask, style, True, backend)


_GA_POSITIONAL = ("scale", "baseline")


def group_advantage(rewards: torch.Tensor, group_size: Optional[int] = None, *args,
                    scale: str = "std", baseline: str = "mean", group_ids: Optional[torch.Tensor] = None,
                    eps: float = 1e-4) -> torch.Tensor:
    """Critic-free TD error: the group-relative advantage of each completion.

    ``A_i = (R_i - b_i) / (std_G(R) + eps)`` with ``b_i`` the group mean (``baseline="mean"``,
    GRPO) or the mean of the other members (``"loo"``, RLOO); ``scale="none"`` skips the division
    (Dr. GRPO). ``std`` is the unbiased sample std of the group, taken as 0 for groups of one, so
    groups of size one and groups with identical rewards get advantage 0, never NaN.

    Args:
        rewards: float ``[B]``.
        group_size: ``G``: completions ``[k*G, (k+1)*G)`` share a prompt. Must divide ``B``.

    Keyword Args:
        scale: ``"std"`` or ``"none"``.
        baseline: ``"mean"`` or ``"loo"``.
        group_ids: int ``[B]`` instead of ``group_size``: completions with equal ids form a group
            (any order, any group sizes).
        eps: added to the group std (finite, ``>= 0``).
    Returns:
        advantages ``[B]``, dtype of ``rewards``.

    ``scale`` and ``baseline`` given by position (``group_advantage(r, 4, "none")``) still work
    for one release, with a ``DeprecationWarning``.

    Compiles with ``torch.compile(fullgraph=True)`` when the groups are given by ``group_size``
    (the non-finite reward check is skipped while compiling); ``group_ids`` takes a
    ``torch.unique``, whose output shape depends on the data, so it needs a graph break.

    Raises:
        ValueError: a NaN or inf reward (naming the first bad index: mark failed rewards as wrong
            instead), or a bad argument.
    """
    if args:
        if len(args) > len(_GA_POSITIONAL):
            raise TypeError(f"group_advantage takes at most 2 positional arguments beyond group_size "
                            f"(deprecated), got {len(args)}")
        deprecated_alias("group_advantage(rewards, group_size, scale, baseline) with scale/baseline by position",
                         "the keywords scale=..., baseline=...")
        scale = args[0]
        if len(args) > 1:
            baseline = args[1]
    rewards = _check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    scale = check_scale(scale)
    baseline = check_baseline(baseline)
    eps = check_eps(eps)
    B = rewards.shape[0]
    group_size = check_groups(group_size, group_ids)
    if not compiling():
        bad = ~torch.isfinite(rewards)  # [B]
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"rewards must be finite: rewards[{i}] = {rewards[i].item()} "
                             f"({int(bad.sum())} non-finite of {B}); mark failed rewards as wrong (e.g. 0) instead")
    r = rewards.to(torch.float64)  # [B]
    if group_ids is None:
        if B % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide the batch size {B}")
        gid = torch.arange(B, device=r.device) // group_size  # [B]
        n_groups = B // group_size
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
