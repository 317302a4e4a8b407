"""TensorDict modules of GRPO-lambda: compose them with ``TensorDictSequential`` and feed TorchRL.

    from tensordict.nn import TensorDictSequential
    credit = TensorDictSequential(
        CriticFreeTD(group_size=8),                   # reward [B] -> advantage [B]
        ClampNegative(clamp_min=-0.1),                # advantage <- max(advantage, -0.1)
        TraceAdvantage(DecayStyle("recent", lam=0.99), mode="credit"),  # -> per-token credit [B, T]
    )
    td = credit(td)   # td holds "reward" [B] and "mask" [B, T]

The credit primitives beyond the trace have modules too: :class:`PrefixGAE` (GAE over the
per-token prefix-tree TD error, ``[B, T]``), :class:`EntropySelect` (top-entropy loss mask) and
:class:`CreditAdvantage` (the advantage of any registered credit method, e.g. one with an
advantage kind of your own, or a multi-turn kind: ``turn_ids_key`` / ``turn_rewards_key`` /
``state_ids_key``). A registered credit method becomes its advantage pipeline in one call::

    pipe = credit_pipeline("prefix-gae-clamp", group_size=8)   # PrefixGAE -> ClampNegative
    pipe = credit_pipeline("turn-index", group_size=8, turn_rewards_key="turn_rewards")   # multi-turn

Keys are configurable (strings or nested tuples); every module documents the shapes it reads and
writes. Rewards and advantages may carry trailing singleton dims (TorchRL's ``[B, 1]``). Masks
are bool or integer (0/1, nonzero = valid: Hugging Face / TRL's ``int64`` masks), ``[B, T]`` or
``[B, T, 1]``.

Renamed (the old names work for one release, with a ``DeprecationWarning``): ``PrefixTD`` ->
``PrefixGAE`` (it writes GAE, while ``F.prefix_td`` returns the TD error), ``PrefixTD(gamma=,
lam=)`` -> ``PrefixGAE(gae_gamma=, gae_lam=)``, ``ClampNegative(min=)`` -> ``ClampNegative(clamp_min=)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._extras import require

require("torchrl", "creditlib.modules")  # before tensordict: a missing extra is named, not just a module

from tensordict import TensorDictBase  # noqa: E402
from tensordict.nn import TensorDictModuleBase  # noqa: E402

from . import functional as F
from ._validation import (as_bool_mask, check_baseline, check_clamp_min, check_eps, check_groups, check_quantile,
                          check_scale, check_style, deprecated_alias)
from .style import DecayStyle

NestedKey = Union[str, Sequence[str]]

__all__ = ["CriticFreeTD", "ClampNegative", "TraceAdvantage", "PrefixGAE", "PrefixTD", "EntropySelect",
           "CreditAdvantage", "credit_pipeline"]

_UNSET = object()


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
        group_size = check_groups(group_size, group_id_key, ids_name="group_id_key")
        self.group_size, self.group_id_key = group_size, group_id_key
        self.scale, self.baseline, self.eps = check_scale(scale), check_baseline(baseline), check_eps(eps)
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
    """Negative-advantage clamp ``A <- max(A, clamp_min)`` (GRPO-lambda default ``clamp_min = -0.1``).

    Large negative advantages times accumulated log-ratios give destructive updates; the clamp
    bounds them. Reads ``advantage_key``, writes ``out_key`` (default: the same key, in place) and,
    when ``clamped_key`` is given, the bool mask of clamped entries.

    Args:
        clamp_min: a finite float ``<= 0`` (the one clamp rule of the library; the same name as in
            the losses and the registry). ``min=`` is its deprecated name (one release, with a
            ``DeprecationWarning``); ``.min`` reads it too.
    """

    def __init__(self, clamp_min: float = -0.1, *, advantage_key: NestedKey = "advantage",
                 out_key: Optional[NestedKey] = None, clamped_key: Optional[NestedKey] = None, min=_UNSET):
        super().__init__()
        if min is not _UNSET:
            deprecated_alias("ClampNegative(min=...)", "ClampNegative(clamp_min=...)")
            clamp_min = min
        if clamp_min is None:
            raise ValueError("clamp_min must be a finite float <= 0, got None (leave ClampNegative out for no clamp)")
        self.clamp_min = check_clamp_min(clamp_min)  # the one clamp rule: finite and <= 0
        self.advantage_key = advantage_key
        self.out_key = advantage_key if out_key is None else out_key
        self.clamped_key = clamped_key
        self.in_keys = [advantage_key]
        self.out_keys = [self.out_key] + ([clamped_key] if clamped_key is not None else [])

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        adv = tensordict.get(self.advantage_key)
        if not adv.is_floating_point():
            raise ValueError(f"advantage ({self.advantage_key!r}) must be floating, got {adv.dtype}")
        tensordict.set(self.out_key, adv.clamp_min(self.clamp_min))
        if self.clamped_key is not None:
            tensordict.set(self.clamped_key, adv < self.clamp_min)
        return tensordict

    @property
    def min(self) -> float:
        """Deprecated name of :attr:`clamp_min`."""
        deprecated_alias("ClampNegative.min", "ClampNegative.clamp_min")
        return self.clamp_min

    def extra_repr(self) -> str:
        return f"clamp_min={self.clamp_min}"


class TraceAdvantage(TensorDictModuleBase):
    """Eligibility trace of GRPO-lambda over the valid tokens of each sequence, in either view.

    * ``mode="credit"`` (forward view, default): reads ``advantage_key`` (``[B]``, ``[B, 1]``,
      ``[B, T]`` or ``[B, T, 1]``) and ``mask_key`` (``[B, T]`` or ``[B, T, 1]``), writes the per-token credit
      ``C_j = sum_{t>=j} w(t, j) A_t`` to ``out_key`` (default ``"traced_advantage"``). Feed it to
      any loss that takes per-token advantages (TorchRL's ``GRPOLoss``: ``keepdim=True``).
    * ``mode="log_weight"`` (backward view): reads ``log_prob_key`` and ``old_log_prob_key``
      (``[B, T]`` or ``[B, T, 1]``) and ``mask_key``; writes the traced log importance weight
      ``z_t = sum_{j<=t} w(t, j) (log pi - log pi_old)_j`` to ``out_key`` (default
      ``"traced_log_weight"``). ``exp(z)`` replaces the token ratio in the PPO surrogate.

    The mask is bool or integer (nonzero = valid), ``[B, T]`` or ``[B, T, 1]``: a 2-D mask is
    always ``[B, T]`` (``T = 1`` included: each row is its own sequence).

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
        check_style(style)
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
        return _read_mask(tensordict, self.mask_key)  # [B, T]

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
    """The mask at ``key`` as bool ``[B, T]``: bool or integer (nonzero = valid), ``[B, T]`` or
    ``[B, T, 1]`` (only a 3-D mask loses its trailing dim: a ``[B, 1]`` mask is ``T = 1``)."""
    mask = as_bool_mask(tensordict.get(key), f"mask ({key!r})")
    if mask.dim() >= 3 and mask.shape[-1] == 1:
        mask = mask.squeeze(-1)  # [B, T, 1] -> [B, T]
    if mask.dim() != 2:
        raise ValueError(f"mask ({key!r}) must be [B, T] or [B, T, 1], got shape {tuple(mask.shape)}")
    return mask


class PrefixGAE(TensorDictModuleBase):
    """GAE over the group prefix-tree TD error (leave-one-out): per-token advantages ``[B, T]``.

    The completions of one prompt form a prefix tree; the value of a prefix is the mean reward of
    the *other* completions of the group that share it, and each valid token's TD error is the
    change of that value (:func:`creditlib.functional.prefix_td`, which returns that TD error).
    GAE(gae_gamma, gae_lam) over it, ``F.traced_credit(delta, mask, DecayStyle("recent", gae_gamma,
    gae_lam))``, is written to ``advantage_key``; with ``gae_gamma = gae_lam = 1`` token ``k`` gets
    the RLOO advantage with a prefix-conditioned baseline, ``(R_i - V_i(k)) / s``.

    Reads ``tokens_key`` (int ``[B, T]``), ``mask_key`` (bool or int ``[B, T]`` or ``[B, T, 1]``: the
    completion tokens; prompt and padding masked out, any layout), ``reward_key`` (``[B]`` or
    ``[B, 1, ...]``), and optionally ``group_id_key`` (int ``[B]``) and ``boundary_key`` (bool
    ``[B, T]``: step ends, for the step-level variant). Writes ``advantage_key``: ``[B, T]``, or
    ``[B, T, 1]`` with ``keepdim=True`` (what TorchRL's ``GRPOLoss`` takes); 0 at masked positions.

    Args:
        group_size: completions ``[k*G, (k+1)*G)`` share a prompt. Give this or ``group_id_key``.
        group_id_key: key of an int tensor ``[B]``: equal ids form a group.
        scale: ``"std"`` (divide by the group std + eps) or ``"none"``.
        gae_gamma, gae_lam: GAE parameters in [0, 1] (default 1, 1); the same names as in
            :class:`~creditlib.credit.CreditMethod`. ``gamma=`` / ``lam=`` are their deprecated
            names (one release, with a ``DeprecationWarning``).
        eps: added to the group std (default 1e-4).
        keepdim: write ``[B, T, 1]``.
    """

    def __init__(self, group_size: Optional[int] = None, *, group_id_key: Optional[NestedKey] = None,
                 scale: str = "std", gae_gamma: float = 1.0, gae_lam: float = 1.0, eps: float = 1e-4,
                 tokens_key: NestedKey = "tokens", mask_key: NestedKey = "mask", reward_key: NestedKey = "reward",
                 boundary_key: Optional[NestedKey] = None, advantage_key: NestedKey = "advantage",
                 keepdim: bool = False, gamma=_UNSET, lam=_UNSET):
        super().__init__()
        if gamma is not _UNSET:
            deprecated_alias(f"{type(self).__name__}(gamma=...)", "gae_gamma=...")
            gae_gamma = gamma
        if lam is not _UNSET:
            deprecated_alias(f"{type(self).__name__}(lam=...)", "gae_lam=...")
            gae_lam = lam
        group_size = check_groups(group_size, group_id_key, ids_name="group_id_key")
        try:
            self.gae = DecayStyle("recent", gamma=gae_gamma, lam=gae_lam)  # validates both in [0, 1]
        except ValueError as e:
            raise ValueError(str(e).replace("gamma", "gae_gamma", 1) if str(e).startswith("gamma")
                             else str(e).replace("lam", "gae_lam", 1)) from None
        self.group_size, self.group_id_key = group_size, group_id_key
        self.scale, self.eps, self.keepdim = check_scale(scale), check_eps(eps), bool(keepdim)
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
        return f"{g}, scale={self.scale!r}, gae_gamma={self.gae.gamma:g}, gae_lam={self.gae.lam:g}"


class PrefixTD(PrefixGAE):
    """Deprecated name of :class:`PrefixGAE` (it writes GAE over the TD error; the TD error itself is
    :func:`creditlib.functional.prefix_td`). Works for one release, with a ``DeprecationWarning``."""

    def __init__(self, *args, **kwargs):
        deprecated_alias("creditlib.modules.PrefixTD", "creditlib.modules.PrefixGAE")
        super().__init__(*args, **kwargs)


class EntropySelect(TensorDictModuleBase):
    """Top-entropy ("forking") token selection: writes a bool loss mask.

    ``out = mask & (entropy >= q)`` with ``q`` the batch-wide ``1 - quantile`` quantile of the
    entropies of the valid tokens (:func:`creditlib.functional.entropy_mask`; TRL's
    ``top_entropy_quantile``). Use the result as the loss mask (``GRPOLambdaLoss(select_key=...)``,
    ``grpo_lambda_loss(loss_mask=...)``) or as the mask of a trace over the selected tokens only.

    Reads ``entropy_key`` (float ``[B, T]`` or ``[B, T, 1]``) and ``mask_key`` (bool or int ``[B, T]``
    or ``[B, T, 1]``); writes ``out_key`` as bool ``[B, T]`` (``[B, T, 1]`` with ``keepdim=True``).

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


class CreditAdvantage(TensorDictModuleBase):
    """The advantage of a credit method (any :class:`~creditlib.credit.Advantage` kind), before its clamp.

    Reads what the method's advantage kind needs (its :class:`~creditlib.credit.Advantage` says):
    ``reward_key`` (``[B]`` or ``[B, 1, ...]``) always, ``mask_key`` (bool or int ``[B, T]`` /
    ``[B, T, 1]``) for per-token kinds or kinds with ``needs_mask``, ``tokens_key`` (int
    ``[B, T]``) with ``needs_tokens``, ``entropy_key`` (float ``[B, T]``) with ``needs_entropy``,
    ``group_id_key`` (int ``[B]``) when given, ``boundary_key`` when given, and the turn inputs
    when their keys are given (``None``: not read): ``turn_ids_key`` (int64 ``[B, T]`` or
    ``[B, T, 1]``, -1 at masked tokens), ``turn_rewards_key`` (float ``[B, K]``) and
    ``state_ids_key`` (int64 ``[B, K]``; the turn kinds only, ``anchor-state`` needs it). Writes
    ``advantage_key``: ``method.raw_advantages(...)``, per sequence with the reward's shape, or per
    token ``[B, T]`` (``[B, T, 1]`` with ``keepdim=True``). :func:`credit_pipeline` appends the
    method's clamp (:class:`ClampNegative`).

    The turn kinds (``turn-grpo``, ``turn-index``, ``anchor-state``, ``prefix-turn``) give every
    token of a turn that turn's advantage; a kind that does not read turns, given
    ``turn_rewards_key``, uses the totals ``reward + turn_rewards.sum(-1)``
    (:meth:`~creditlib.credit.CreditMethod.advantages`).

    Args:
        method: a registered name or a :class:`~creditlib.credit.CreditMethod`.
        group_size / group_id_key: the groups (exactly one).
    """

    def __init__(self, method, group_size: Optional[int] = None, *, group_id_key: Optional[NestedKey] = None,
                 reward_key: NestedKey = "reward", mask_key: NestedKey = "mask", tokens_key: NestedKey = "tokens",
                 entropy_key: NestedKey = "entropy", boundary_key: Optional[NestedKey] = None,
                 advantage_key: NestedKey = "advantage", keepdim: bool = False,
                 turn_ids_key: Optional[NestedKey] = None, turn_rewards_key: Optional[NestedKey] = None,
                 state_ids_key: Optional[NestedKey] = None):
        super().__init__()
        from .credit import get_credit

        self.method = get_credit(method)
        kind = self.method.advantage_kind
        self.group_size = check_groups(group_size, group_id_key, ids_name="group_id_key")
        if boundary_key is not None and not kind.boundary:
            raise ValueError(f"boundary_key applies to advantage kinds that take step boundaries, not "
                             f"advantage={kind.name!r} (credit method {self.method.name!r})")
        if state_ids_key is not None and not kind.turns:
            raise ValueError(f"state_ids_key applies to the turn kinds that read states ('anchor_state'), not "
                             f"advantage={kind.name!r} (credit method {self.method.name!r}): it would be ignored")
        self.turn_ids_key, self.turn_rewards_key, self.state_ids_key = turn_ids_key, turn_rewards_key, state_ids_key
        self.group_id_key, self.reward_key, self.mask_key = group_id_key, reward_key, mask_key
        self.tokens_key, self.entropy_key, self.boundary_key = tokens_key, entropy_key, boundary_key
        self.advantage_key, self.keepdim = advantage_key, bool(keepdim)
        self.in_keys = [reward_key] + [k for k, on in ((mask_key, kind.needs_mask), (tokens_key, kind.needs_tokens),
                                                       (entropy_key, kind.needs_entropy),
                                                       (group_id_key, group_id_key is not None),
                                                       (boundary_key, boundary_key is not None),
                                                       (turn_ids_key, turn_ids_key is not None),
                                                       (turn_rewards_key, turn_rewards_key is not None),
                                                       (state_ids_key, state_ids_key is not None)) if on]
        self.out_keys = [advantage_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        kind = self.method.advantage_kind
        reward = tensordict.get(self.reward_key)
        r = _squeeze_trailing(reward, f"reward ({self.reward_key!r})", 1)  # [B]
        mask = _read_mask(tensordict, self.mask_key) if kind.needs_mask else None  # [B, T]
        tokens = entropy = boundary = gid = None
        if kind.needs_tokens:
            tokens = tensordict.get(self.tokens_key)
            tokens = _squeeze_like(tokens, f"tokens ({self.tokens_key!r})", mask.shape) if mask is not None \
                else tokens  # [B, T]
        if kind.needs_entropy:
            entropy = tensordict.get(self.entropy_key)
            if mask is not None:
                entropy = _squeeze_like(entropy, f"entropy ({self.entropy_key!r})", mask.shape)  # [B, T]
        if self.group_id_key is not None:
            gid = _squeeze_trailing(tensordict.get(self.group_id_key), f"group ids ({self.group_id_key!r})", 1)  # [B]
        if self.boundary_key is not None:
            boundary = as_bool_mask(tensordict.get(self.boundary_key), f"boundary ({self.boundary_key!r})")
            boundary = _squeeze_like(boundary, f"boundary ({self.boundary_key!r})", mask.shape)  # [B, T]
        turn_ids = turn_rewards = state_ids = None
        if self.turn_ids_key is not None:
            turn_ids = tensordict.get(self.turn_ids_key)
            name = f"turn ids ({self.turn_ids_key!r})"
            if mask is not None:
                turn_ids = _squeeze_like(turn_ids, name, mask.shape)  # [B, T]
            elif turn_ids.dim() >= 3 and turn_ids.shape[-1] == 1:
                turn_ids = turn_ids.squeeze(-1)  # [B, T, 1] -> [B, T]
        if self.turn_rewards_key is not None:
            turn_rewards = _per_turn(tensordict.get(self.turn_rewards_key), f"turn rewards ({self.turn_rewards_key!r})")
        if self.state_ids_key is not None:
            state_ids = _per_turn(tensordict.get(self.state_ids_key), f"state ids ({self.state_ids_key!r})")
        adv = self.method.raw_advantages(r, mask, tokens=tokens, group_size=self.group_size, group_ids=gid,
                                         boundary=boundary, entropy=entropy, turn_ids=turn_ids,
                                         turn_rewards=turn_rewards, state_ids=state_ids)  # [B] or [B, T]
        if kind.per_token:
            out = adv.unsqueeze(-1) if self.keepdim else adv  # [B, T] or [B, T, 1]
        else:
            out = adv.reshape(reward.shape)  # the reward's shape ([B], [B, 1], ...)
        tensordict.set(self.advantage_key, out)
        return tensordict

    def extra_repr(self) -> str:
        g = f"group_size={self.group_size}" if self.group_size else f"group_id_key={self.group_id_key!r}"
        turns = "".join(f", {k}={v!r}" for k, v in (("turn_ids_key", self.turn_ids_key),
                                                    ("turn_rewards_key", self.turn_rewards_key),
                                                    ("state_ids_key", self.state_ids_key)) if v is not None)
        return f"method={self.method.name!r}, advantage={self.method.advantage_kind.name!r}, {g}{turns}"


def _per_turn(t: torch.Tensor, name: str) -> torch.Tensor:
    """A per-turn tensor ``[B, K]`` (a trailing singleton dim dropped: ``[B, K, 1]``)."""
    if t.dim() >= 3 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, K] (one column per turn) or [B, K, 1], got shape {tuple(t.shape)}")
    return t


def _builtin_stage(m, group_size, group_id_key, reward_key, mask_key, tokens_key, advantage_key, boundary_key,
                   keepdim):
    """The dedicated module of a built-in advantage kind (``None`` for other kinds)."""
    from .credit import GROUP, PREFIX_TD

    kind = m.advantage_kind
    if kind is GROUP:
        if boundary_key is not None:
            raise ValueError(f"boundary_key applies to advantage kinds that take step boundaries ('prefix_td'), "
                             f"not advantage='group' (credit method {m.name!r})")
        return CriticFreeTD(group_size, group_id_key=group_id_key, scale=m.scale, baseline=m.baseline,
                            reward_key=reward_key, advantage_key=advantage_key)
    if kind is PREFIX_TD:
        return PrefixGAE(group_size, group_id_key=group_id_key, scale=m.scale, gae_gamma=m.gae_gamma,
                         gae_lam=m.gae_lam, tokens_key=tokens_key, mask_key=mask_key, reward_key=reward_key,
                         boundary_key=boundary_key, advantage_key=advantage_key, keepdim=keepdim)
    return None


def credit_pipeline(method, *, group_size: Optional[int] = None, group_id_key: Optional[NestedKey] = None,
                    reward_key: NestedKey = "reward", mask_key: NestedKey = "mask",
                    tokens_key: NestedKey = "tokens", advantage_key: NestedKey = "advantage",
                    boundary_key: Optional[NestedKey] = None, entropy_key: NestedKey = "entropy",
                    select_key: NestedKey = "entropy_mask", keepdim: bool = False,
                    turn_ids_key: Optional[NestedKey] = None, turn_rewards_key: Optional[NestedKey] = None,
                    state_ids_key: Optional[NestedKey] = None):
    """The advantage stage of a credit method as a ``TensorDictSequential``.

    ``method`` is a registered name (``"grpo-lambda"``, ``"prefix-gae"``, ... see
    :func:`creditlib.credit.list_credits`) or a :class:`~creditlib.credit.CreditMethod`. The
    pipeline reads the method's advantage kind from the registry: ``CriticFreeTD``
    (``advantage="group"``), ``PrefixGAE`` (``"prefix_td"``) or :class:`CreditAdvantage` (any other
    kind, e.g. one registered with :func:`creditlib.credit.register_credit`, the turn kinds, and
    every kind when a turn key is given), then
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
        turn_ids_key / turn_rewards_key / state_ids_key: the turn inputs of
            :class:`CreditAdvantage` (``None``: not read), e.g. for ``get_credit("anchor-state")``::

                pipe = credit_pipeline("anchor-state", group_size=8, turn_ids_key="turn_ids",
                                       turn_rewards_key="turn_rewards", state_ids_key="state_ids")
        other keys: where each module reads and writes.
    """
    from tensordict.nn import TensorDictSequential

    from .credit import get_credit

    m = get_credit(method)
    turn_keys = (turn_ids_key, turn_rewards_key, state_ids_key)
    stage = None
    if all(k is None for k in turn_keys):  # the dedicated modules of group / prefix_td read no turns
        stage = _builtin_stage(m, group_size, group_id_key, reward_key, mask_key, tokens_key, advantage_key,
                               boundary_key, keepdim)
    if stage is None:
        stage = CreditAdvantage(m, group_size, group_id_key=group_id_key, reward_key=reward_key, mask_key=mask_key,
                                tokens_key=tokens_key, entropy_key=entropy_key, boundary_key=boundary_key,
                                advantage_key=advantage_key, keepdim=keepdim, turn_ids_key=turn_ids_key,
                                turn_rewards_key=turn_rewards_key, state_ids_key=state_ids_key)
    mods = [stage]
    if m.clamp_min is not None:
        mods.append(ClampNegative(clamp_min=m.clamp_min, advantage_key=advantage_key))
    if m.entropy_quantile is not None:
        mods.append(EntropySelect(m.entropy_quantile, entropy_key=entropy_key, mask_key=mask_key,
                                  out_key=select_key))
    return TensorDictSequential(*mods)
