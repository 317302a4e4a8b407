"""TensorDict modules of GRPO-lambda: compose them with ``TensorDictSequential`` and feed TorchRL.

    from tensordict.nn import TensorDictSequential
    credit = TensorDictSequential(
        CriticFreeTD(group_size=8),                   # reward [B] -> advantage [B]
        ClampNegative(min=-0.1),                      # advantage <- max(advantage, -0.1)
        TraceAdvantage(DecayStyle("recent", lam=0.99), mode="credit"),  # -> per-token credit [B, T]
    )
    td = credit(td)   # td holds "reward" [B] and "mask" [B, T]

Keys are configurable (strings or nested tuples); every module documents the shapes it reads and
writes. Rewards and advantages may carry trailing singleton dims (TorchRL's ``[B, 1]``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from . import functional as F
from .style import DecayStyle

NestedKey = Union[str, Sequence[str]]

__all__ = ["CriticFreeTD", "ClampNegative", "TraceAdvantage"]


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
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
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
        try:
            fmin = float(min)
        except (TypeError, ValueError):
            raise ValueError(f"min must be a finite float <= 0, got {min!r}") from None
        if not math.isfinite(fmin) or fmin > 0:
            raise ValueError(f"min must be a finite float <= 0, got {min!r}")
        self.min = fmin
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
