"""TensorDict modules of GRPO-lambda: compose them with ``TensorDictSequential`` and feed TorchRL.

    from tensordict.nn import TensorDictSequential
    credit = TensorDictSequential(
        CriticFreeTD(group_size=8),                   # reward [B] -> advantage [B]
        ClampNegative(min=-0.1),                      # advantage <- max(advantage, -0.1)
        TraceAdvantage(DecayStyle("recent", lam=0.99), mode="credit"),  # -> per-token credit [B, T]
    )
    td = credit(td)   # td holds "reward" [B] and "mask" [B, T]

The credit primitives beyond the trace have modules too: :class:`PrefixTD` (per-token prefix-tree
TD error with GAE, ``[B, T]``) and :class:`EntropySelect` (top-entropy loss mask). A registered
credit method becomes its advantage pipeline in one call::

    pipe = credit_pipeline("prefix-gae-clamp", group_size=8)   # PrefixTD -> ClampNegative

Keys are configurable (strings or nested tuples); every module documents the shapes it reads and
writes. Rewards and advantages may carry trailing singleton dims (TorchRL's ``[B, 1]``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._extras import require

require("torchrl", "creditlib.modules")  # before tensordict: a missing extra is named, not just a module

from tensordict import TensorDictBase  # noqa: E402
from tensordict.nn import TensorDictModuleBase  # noqa: E402

from . import functional as F
from ._validation import check_clamp_min, check_positive_int, check_quantile
from .style import DecayStyle

NestedKey = Union[str, Sequence[str]]

__all__ = ["CriticFreeTD", "ClampNegative", "TraceAdvantage", "PrefixTD", "EntropySelect", "credit_pipeline"]


def _squeeze_trailing(t: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """Drop trailing singleton dims until ``t`` has ``ndim`` dims (``[B, 1, 1] -> [B]``)."""
    while t.dim() > ndim and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} non-singleton dim(s), got shape {tuple(t.shape)}")
    return t


class CriticFreeTD(TensorDictModuleBase):
    """Critic-free TD error: the group-relative advantage ``(R - baseline) / (std_G(R) + eps)``.

    Every completion of a prompt is scored against the others of its group: no value network.
    Reads ``reward_key`` (``[B]`` or ``[B, 1, ...]``) and, if given, ``group_id_key`` (int ``[B]``);
    writes ``advantage_key`` with the reward's shape.

    Args:
        group_size: completions ``[k*G, (k+1)*G)`` share a prompt (must divide ``B``). Give this or
            ``group_id_key``.
        group_id_key: key of an int tensor ``[B]``: equal ids form a group (any order and sizes).
        scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO).
        baseline: ``"mean"`` (GRPO) or ``"loo"`` (leave-one-out, RLOO).
        eps: added to the group std (default 1e-4).
        reward_key, advantage_key: tensordict keys.
    """

    def __init__(self, group_size: Optional[int] = None, *, group_id_key: Optional[NestedKey] = None,
                 scale: str = "std", baseline: str = "mean", eps: float = 1e-4,
                 reward_key: NestedKey = "reward", advantage_key: NestedKey = "advantage"):
        super().__init__()
        if (group_size is None) == (group_id_key is None):
            raise ValueError("CriticFreeTD needs exactly one of group_size or group_id_key")
        if group_size is not None:
            group_size = check_positive_int("group_size", group_size)
        if scale not in ("std", "none"):
            raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
        if baseline not in ("mean", "loo"):
            raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
        self.group_size, self.group_id_key = group_size, group_id_key
        self.scale, self.baseline, self.eps = scale, baseline, float(eps)
        self.reward_key, self.advantage_key = reward_key, advantage_key
        self.in_keys = [reward_key] + ([group_id_key] if group_id_key is not None else [])
        self.out_keys = [advantage_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        reward = tensordict.get(self.reward_key)
        r = _squeeze_trailing(reward, f"reward ({self.reward_key!r})", 1)  # [B]
        gid = tensordict.get(self.group_id_key) if self.group_id_key is not None else None
        if gid is not None:
            gid = _squeeze_trailing(gid, f"group ids ({self.group_id_key!r})", 1)  # [B]
        adv = F.group_advantage(r, self.group_size, scale=self.scale, baseline=self.baseline,
                                group_ids=gid, eps=self.eps)  # [B]
        tensordict.set(self.advantage_key, adv.reshape(reward.shape))
        return tensordict

    def extra_repr(self) -> str:
        g = f"group_size={self.group_size}" if self.group_size else f"group_id_key={self.group_id_key!r}"
        return f"{g}, scale={self.scale!r}, baseline={self.baseline!r}"


class ClampNegative(TensorDictModuleBase):
    """Negative-advantage clamp ``A <- max(A, min)`` (GRPO-lambda default ``min = -0.1``).

    Large negative advantages times accumulated log-ratios give destructive updates; the clamp
    bounds them. Reads ``advantage_key``, writes ``out_key`` (default: the same key, in place) and,
    when ``clamped_key`` is given, the bool mask of clamped entries.
    """

    def __init__(self, min: float = -0.1, *, advantage_key: NestedKey = "advantage",
                 out_key: Optional[NestedKey] = None, clamped_key: Optional[NestedKey] = None):
        super().__init__()
        if min is None:
            raise ValueError("min must be a finite float <= 0, got None (leave ClampNegative out for no clamp)")
        self.min = check_clamp_min(min, "min")  # the one clamp rule: finite and <= 0
        self.advantage_key = advantage_key
        self.out_key = advantage_key if out_key is None else out_key
        self.clamped_key = clamped_key
        self.in_keys = [advantage_key]
        self.out_keys = [self.out_key] + ([clamped_key] if clamped_key is not None else [])

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        adv = tensordict.get(self.advantage_key)
        if not adv.is_floating_point():
            raise ValueError(f"advantage ({self.advantage_key!r}) must be floating, got {adv.dtype}")
        tensordict.set(self.out_key, adv.clamp_min(self.min))
        if self.clamped_key is not None:
            tensordict.set(self.clamped_key, adv < self.min)
        return tensordict

    def extra_repr(self) -> str:
        return f"min={self.min}"


class TraceAdvantage(TensorDictModuleBase):
    """Eligibility trace of GRPO-lambda over the valid tokens of each sequence, in either view.

    * ``mode="credit"`` (forward view, default): reads ``advantage_key`` (``[B]``, ``[B, 1]``,
      ``[B, T]`` or ``[B, T, 1]``) and ``mask_key`` (bool ``[B, T]``), writes the per-token credit
      ``C_j = sum_{t>=j} w(t, j) A_t`` to ``out_key`` (default ``"traced_advantage"``). Feed it to
      any loss that takes per-token advantages (TorchRL's ``GRPOLoss``: ``keepdim=True``).
    * ``mode="log_weight"`` (backward view): reads ``log_prob_key`` and ``old_log_prob_key``
      (``[B, T]`` or ``[B, T, 1]``) and ``mask_key``; writes the traced log importance weight
      ``z_t = sum_{j<=t} w(t, j) (log pi - log pi_old)_j`` to ``out_key`` (default
      ``"traced_log_weight"``). ``exp(z)`` replaces the token ratio in the PPO surrogate.

    Args:
        style: the :class:`DecayStyle`.
        mode: ``"credit"`` or ``"log_weight"``.
        keepdim: write ``[B, T, 1]`` instead of ``[B, T]``.
        backend: see :func:`creditlib.functional.eligibility_trace`.
    """

    def __init__(self, style: DecayStyle, mode: str = "credit", *, mask_key: NestedKey = "mask",
                 advantage_key: NestedKey = "advantage", log_prob_key: NestedKey = "log_prob",
                 old_log_prob_key: NestedKey = "old_log_prob", out_key: Optional[NestedKey] = None,
                 keepdim: bool = False, backend: str = "auto"):
        super().__init__()
        if not isinstance(style, DecayStyle):
            raise ValueError(f"style must be a creditlib.DecayStyle, got {type(style).__name__}")
        if mode not in ("credit", "log_weight"):
            raise ValueError(f"mode must be 'credit' or 'log_weight', got {mode!r}")
        self.style, self.mode, self.keepdim, self.backend = style, mode, bool(keepdim), backend
        self.mask_key = mask_key
        self.advantage_key, self.log_prob_key, self.old_log_prob_key = advantage_key, log_prob_key, old_log_prob_key
        if out_key is None:
            out_key = "traced_advantage" if mode == "credit" else "traced_log_weight"
        self.out_key = out_key
        if mode == "credit":
            self.in_keys = [advantage_key, mask_key]
        else:
            self.in_keys = [log_prob_key, old_log_prob_key, mask_key]
        self.out_keys = [out_key]

    def _mask(self, tensordict: TensorDictBase) -> torch.Tensor:
        mask = tensordict.get(self.mask_key)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask ({self.mask_key!r}) must be a bool tensor, got {mask.dtype}")
        if mask.dim() >= 2 and mask.shape[-1] == 1:
            mask = mask.squeeze(-1)  # [B, T, 1] -> [B, T]
        return mask

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        mask = self._mask(tensordict)  # [B, T]
        T = mask.shape[-1]
        if self.mode == "credit":
            adv = tensordict.get(self.advantage_key)
            lead = mask.shape[:-1]
            if adv.shape[: len(lead)] != lead:
                raise ValueError(f"advantage ({self.advantage_key!r}) shape {tuple(adv.shape)} does not "
                                 f"start with the mask's batch shape {tuple(lead)}")
            rest = adv.shape[len(lead):]
            if all(s == 1 for s in rest):
                a = adv.reshape(lead)  # [B] per-sequence advantage
            elif rest in ((T,), (T, 1)):
                a = adv.reshape(mask.shape)  # [B, T] per-token advantage
            else:
                raise ValueError(f"advantage ({self.advantage_key!r}) must be [B], [B, 1], [B, T] or "
                                 f"[B, T, 1] with T = {T}, got {tuple(adv.shape)}")
            out = F.traced_credit(a, mask, self.style, backend=self.backend)  # [B, T]
        else:
            lp = tensordict.get(self.log_prob_key)
            old = tensordict.get(self.old_log_prob_key)
            if lp.shape != old.shape:
                raise ValueError(f"log_prob {tuple(lp.shape)} and old_log_prob {tuple(old.shape)} shapes differ")
            lp = lp.reshape(mask.shape) if lp.numel() == mask.numel() else lp
            old = old.reshape(mask.shape) if old.numel() == mask.numel() else old
            # the log-ratio is taken only where valid: masked log-probs may hold padding garbage
            x = lp - old.to(lp.dtype)  # [B, T]
            out = F.eligibility_trace(x, mask, self.style, backend=self.backend)  # [B, T]
        if self.keepdim:
            out = out.unsqueeze(-1)  # [B, T, 1]
        tensordict.set(self.out_key, out)
        return tensordict

    def extra_repr(self) -> str:
        return f"style={self.style}, mode={self.mode!r}"


def _squeeze_like(t: torch.Tensor, name: str, shape: torch.Size) -> torch.Tensor:
    """``t`` reshaped to ``shape`` when it is ``shape`` plus trailing singleton dims (``[B, T, 1]``)."""
    if t.shape == shape:
        return t
    if t.shape[: len(shape)] == shape and all(s == 1 for s in t.shape[len(shape):]):
        return t.reshape(shape)
    raise ValueError(f"{name} must have shape {tuple(shape)} (or with trailing singleton dims), "
                     f"got {tuple(t.shape)}")


def _read_mask(tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
    mask = tensordict.get(key)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"mask ({key!r}) must be a bool tensor [B, T], got {got}")
    if mask.dim() >= 3 and mask.shape[-1] == 1:
        mask = mask.squeeze(-1)  # [B, T, 1] -> [B, T]
    if mask.dim() != 2:
        raise ValueError(f"mask ({key!r}) must be [B, T] or [B, T, 1], got shape {tuple(mask.shape)}")
    return mask


class PrefixTD(TensorDictModuleBase):
    """Group prefix-tree TD error (leave-one-out) with GAE: per-token advantages ``[B, T]``.

    The completions of one prompt form a prefix tree; the value of a prefix is the mean reward of
    the *other* completions of the group that share it, and each valid token's TD error is the
    change of that value (:func:`creditlib.functional.prefix_td`). GAE(gamma, lam) over it,
    ``F.traced_credit(delta, mask, DecayStyle("recent", gamma, lam))``, is written to
    ``advantage_key``; with ``gamma = lam = 1`` token ``k`` gets the RLOO advantage with a
    prefix-conditioned baseline, ``(R_i - V_i(k)) / s``.

    Reads ``tokens_key`` (int ``[B, T]``), ``mask_key`` (bool ``[B, T]`` or ``[B, T, 1]``: the
    completion tokens; prompt and padding masked out, any layout), ``reward_key`` (``[B]`` or
    ``[B, 1, ...]``), and optionally ``group_id_key`` (int ``[B]``) and ``boundary_key`` (bool
    ``[B, T]``: step ends, for the step-level variant). Writes ``advantage_key``: ``[B, T]``, or
    ``[B, T, 1]`` with ``keepdim=True`` (what TorchRL's ``GRPOLoss`` takes); 0 at masked positions.

    Args:
        group_size: completions ``[k*G, (k+1)*G)`` share a prompt. Give this or ``group_id_key``.
        group_id_key: key of an int tensor ``[B]``: equal ids form a group.
        scale: ``"std"`` (divide by the group std + eps) or ``"none"``.
        gamma, lam: GAE parameters in [0, 1] (default 1, 1).
        eps: added to the group std (default 1e-4).
        keepdim: write ``[B, T, 1]``.
    """

    def __init__(self, group_size: Optional[int] = None, *, group_id_key: Optional[NestedKey] = None,
                 scale: str = "std", gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-4,
                 tokens_key: NestedKey = "tokens", mask_key: NestedKey = "mask", reward_key: NestedKey = "reward",
                 boundary_key: Optional[NestedKey] = None, advantage_key: NestedKey = "advantage",
                 keepdim: bool = False):
        super().__init__()
        if (group_size is None) == (group_id_key is None):
            raise ValueError("PrefixTD needs exactly one of group_size or group_id_key")
        if group_size is not None:
            group_size = check_positive_int("group_size", group_size)
        if scale not in ("std", "none"):
            raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
        self.gae = DecayStyle("recent", gamma=gamma, lam=lam)  # validates gamma, lam in [0, 1]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0) or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        self.group_size, self.group_id_key = group_size, group_id_key
        self.scale, self.eps, self.keepdim = scale, float(eps), bool(keepdim)
        self.tokens_key, self.mask_key, self.reward_key = tokens_key, mask_key, reward_key
        self.boundary_key, self.advantage_key = boundary_key, advantage_key
        self.in_keys = [tokens_key, mask_key, reward_key] + [k for k in (group_id_key, boundary_key) if k is not None]
        self.out_keys = [advantage_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        mask = _read_mask(tensordict, self.mask_key)  # [B, T]
        tokens = _squeeze_like(tensordict.get(self.tokens_key), f"tokens ({self.tokens_key!r})", mask.shape)  # [B, T]
        reward = _squeeze_trailing(tensordict.get(self.reward_key), f"reward ({self.reward_key!r})", 1)  # [B]
        gid = None
        if self.group_id_key is not None:
            gid = _squeeze_trailing(tensordict.get(self.group_id_key), f"group ids ({self.group_id_key!r})", 1)  # [B]
        boundary = None
        if self.boundary_key is not None:
            boundary = _squeeze_like(tensordict.get(self.boundary_key), f"boundary ({self.boundary_key!r})",
                                     mask.shape)  # [B, T]
        delta = F.prefix_td(tokens, mask, reward, self.group_size, group_ids=gid, scale=self.scale,
                            eps=self.eps, boundary=boundary)  # [B, T]
        adv = F.traced_credit(delta, mask, self.gae)  # [B, T] GAE(gamma, lam)
        if self.keepdim:
            adv = adv.unsqueeze(-1)  # [B, T, 1]
        tensordict.set(self.advantage_key, adv)
        return tensordict

    def extra_repr(self) -> str:
        g = f"group_size={self.group_size}" if self.group_size else f"group_id_key={self.group_id_key!r}"
        return f"{g}, scale={self.scale!r}, gamma={self.gae.gamma:g}, lam={self.gae.lam:g}"


class EntropySelect(TensorDictModuleBase):
    """Top-entropy ("forking") token selection: writes a bool loss mask.

    ``out = mask & (entropy >= q)`` with ``q`` the batch-wide ``1 - quantile`` quantile of the
    entropies of the valid tokens (:func:`creditlib.functional.entropy_mask`; TRL's
    ``top_entropy_quantile``). Use the result as the loss mask (``GRPOLambdaLoss(select_key=...)``,
    ``grpo_lambda_loss(loss_mask=...)``) or as the mask of a trace over the selected tokens only.

    Reads ``entropy_key`` (float ``[B, T]`` or ``[B, T, 1]``) and ``mask_key`` (bool ``[B, T]`` or
    ``[B, T, 1]``); writes ``out_key`` as bool ``[B, T]`` (``[B, T, 1]`` with ``keepdim=True``).

    Args:
        quantile: fraction of valid tokens to keep, in (0, 1] (1 keeps every valid token).
    """

    def __init__(self, quantile: float = 0.2, *, entropy_key: NestedKey = "entropy", mask_key: NestedKey = "mask",
                 out_key: NestedKey = "entropy_mask", keepdim: bool = False):
        super().__init__()
        self.quantile, self.keepdim = check_quantile(quantile, "quantile"), bool(keepdim)
        self.entropy_key, self.mask_key, self.out_key = entropy_key, mask_key, out_key
        self.in_keys = [entropy_key, mask_key]
        self.out_keys = [out_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        mask = _read_mask(tensordict, self.mask_key)  # [B, T]
        entropy = _squeeze_like(tensordict.get(self.entropy_key), f"entropy ({self.entropy_key!r})", mask.shape)
        sel = F.entropy_mask(entropy, mask, self.quantile)  # bool [B, T]
        tensordict.set(self.out_key, sel.unsqueeze(-1) if self.keepdim else sel)
        return tensordict

    def extra_repr(self) -> str:
        return f"quantile={self.quantile:g}"


def credit_pipeline(method, *, group_size: Optional[int] = None, group_id_key: Optional[NestedKey] = None,
                    reward_key: NestedKey = "reward", mask_key: NestedKey = "mask",
                    tokens_key: NestedKey = "tokens", advantage_key: NestedKey = "advantage",
                    boundary_key: Optional[NestedKey] = None, entropy_key: NestedKey = "entropy",
                    select_key: NestedKey = "entropy_mask", keepdim: bool = False):
    """The advantage stage of a credit method as a ``TensorDictSequential``.

    ``method`` is a registered name (``"grpo-lambda"``, ``"prefix-gae"``, ... see
    :func:`creditlib.credit.list_credits`) or a :class:`~creditlib.credit.CreditMethod`. The
    pipeline is ``CriticFreeTD`` (``advantage="group"``) or ``PrefixTD`` (``"prefix_td"``), then
    ``ClampNegative`` when the method clamps, then ``EntropySelect`` (writing ``select_key``)
    when it selects tokens by entropy. It writes exactly ``method.advantages(...)`` and
    ``method.loss_mask(...)``. The log-ratio style ``method.trace`` belongs to the loss::

        method = get_credit("grpo-lambda")
        pipe = credit_pipeline(method, group_size=8)
        loss_fn = GRPOLambdaLoss.from_credit(method, actor)   # style=method.trace, ...

    Args:
        group_size / group_id_key: the groups (exactly one).
        keepdim: per-token advantages as ``[B, T, 1]`` (TorchRL's ``GRPOLoss``). Group advantages
            keep the reward's shape (write ``reward`` as ``[B, 1, 1]`` for TorchRL).
        other keys: where each module reads and writes.
    """
    from tensordict.nn import TensorDictSequential

    from .credit import CreditMethod, get_credit

    m = get_credit(method) if not isinstance(method, CreditMethod) else method
    if m.advantage == "group":
        if boundary_key is not None:
            raise ValueError(f"boundary_key applies to advantage='prefix_td' methods only (credit method {m.name!r})")
        mods = [CriticFreeTD(group_size, group_id_key=group_id_key, scale=m.scale, baseline=m.baseline,
                             reward_key=reward_key, advantage_key=advantage_key)]
    else:
        mods = [PrefixTD(group_size, group_id_key=group_id_key, scale=m.scale, gamma=m.gamma, lam=m.lam,
                         tokens_key=tokens_key, mask_key=mask_key, reward_key=reward_key,
                         boundary_key=boundary_key, advantage_key=advantage_key, keepdim=keepdim)]
    if m.clamp_min is not None:
        mods.append(ClampNegative(min=m.clamp_min, advantage_key=advantage_key))
    if m.entropy_quantile is not None:
        mods.append(EntropySelect(m.entropy_quantile, entropy_key=entropy_key, mask_key=mask_key,
                                  out_key=select_key))
    return TensorDictSequential(*mods)
