"""creditlib.credit: the registry of credit-assignment methods (one name = one configuration).

A :class:`CreditMethod` bundles every choice a trainer makes about credit assignment:

* how a completion's reward becomes an advantage: an :class:`Advantage` (``advantage="group"``:
  the per-sequence GRPO/RLOO advantage of :func:`creditlib.functional.group_advantage`;
  ``"prefix_td"``: the per-token prefix-tree TD error of :func:`creditlib.functional.prefix_td`
  with GAE(gae_gamma, gae_lam) over it; ``"treerl"``; the turn kinds below; or your own), then
  the negative-advantage clamp;
* which log-ratio the loss uses (``trace``: a :class:`~creditlib.DecayStyle`, e.g. GRPO-lambda's
  decayed trace or GSPO's sequence-level ratio; ``None``: the plain token ratio);
* which tokens enter the loss (``entropy_quantile``: only the top-entropy "forking" tokens).

The recipe (``--credit NAME``), the TRL and verl adapters and the TorchRL modules all select a
method by name from this registry::

    from creditlib.credit import get_credit, list_credits
    method = get_credit("prefix-gae")
    adv = method.advantages(rewards, mask, tokens=tokens, group_size=8)   # [B] or [B, T]
    loss_mask = method.loss_mask(mask, entropy)                             # bool [B, T]
    style = method.trace                                                    # for the loss

Adding a credit method is one registration, like verl's ``register_adv_est``: the
:class:`Advantage` carries the function that turns a standard :class:`CreditBatch` (rewards,
mask, token ids, groups, step boundaries, entropies) into advantages, and what it needs; every
layer (``CreditMethod.advantages``, :func:`creditlib.modules.credit_pipeline`, the verl
estimator, the TRL trainer, the recipe) reads it from the registry::

    def my_adv(method, batch):              # -> [B] or [B, T]
        delta = F.prefix_td(batch.tokens, batch.mask, batch.rewards, batch.group_size,
                            group_ids=batch.group_ids, scale=method.scale)   # [B, T]
        return delta.cumsum(-1)
    register_credit(CreditMethod("my-method", advantage=Advantage(
        "my_adv", my_adv, per_token=True, needs_tokens=True)))

Multi-turn trajectories (agents; a trajectory is one row, its turns the runs of valid tokens):
the turn kinds ``"turn_grpo"``, ``"turn_index"``, ``"anchor_state"`` (GiGPO) and ``"prefix_turn"``
(methods ``turn-grpo``, ``turn-index``, ``anchor-state``, ``prefix-turn``) give every token of a
turn that turn's advantage (:func:`creditlib.functional.turn_credit`). They read the keyword
inputs ``turn_ids`` (int64 ``[B, T]``; default: each maximal run of valid tokens is one turn, or
each step when ``boundary`` is given), ``turn_rewards`` (float ``[B, K]``, the reward after each
turn) and ``state_ids`` (int64 ``[B, K]``, ``anchor-state`` only), and the options ``turn_gamma``
(the discount over turns) and ``omega`` (the weight of GiGPO's state advantage)::

    adv = get_credit("anchor-state").advantages(rewards, mask, group_size=8, turn_ids=ids,
                                                turn_rewards=tr, state_ids=states)   # [B, T]

Every method runs on multi-turn rows: a kind that does not read turns, given ``turn_rewards``,
sees the undiscounted total ``rewards + turn_rewards.sum(-1)`` as its rewards (``turn_ids``, if
given, is checked against the mask and the rewards' turns); given ``state_ids`` it raises (they
would be ignored).

This module imports torch only (no tensordict): every trainer can use it.
"""

from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass, replace as _dc_replace
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import functional as F
from ._validation import (BASELINES, SCALES, as_bool_mask, check_baseline, check_clamp_min, check_eps,
                          check_float, check_quantile, check_scale, check_style, check_unit, deprecated_alias)
from .style import DecayStyle

__all__ = ["CreditMethod", "CreditBatch", "Advantage", "register_credit", "get_credit", "list_credits",
           "register_advantage", "get_advantage", "list_advantages", "normalize_name",
           "ADVANTAGES", "SCALES", "BASELINES"]


def normalize_name(name: str) -> str:
    """The registry key of a name: stripped, lower-case, ``_`` read as ``-`` (``" My_Method"`` ->
    ``"my-method"``). Used on registration and on lookup."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


# ----------------------------------------------------------------------------- advantage kinds
@dataclass(frozen=True)
class CreditBatch:
    """The standard batch every :class:`Advantage` function receives (``B`` completions, ``T`` tokens).

    Attributes:
        rewards: float ``[B]``, one scalar reward per completion.
        mask: bool ``[B, T]`` completion tokens, or ``None`` (not given).
        tokens: int ``[B, T]`` completion token ids, or ``None``.
        group_size: ``G`` (rows ``[k G, (k + 1) G)`` share a prompt), or ``None`` when ``group_ids``.
        group_ids: int ``[B]``: equal ids form a group, or ``None`` when ``group_size``.
        boundary: bool ``[B, T]`` step ends, or ``None``.
        entropy: float ``[B, T]`` per-token policy entropy, or ``None``.
        turn_ids: int64 ``[B, T]`` the turn of each valid token (-1 elsewhere), or ``None``.
        turn_rewards: float ``[B, K]`` the reward after each turn, or ``None``. (A kind that does
            not read turns receives ``None`` here and the totals in ``rewards``.)
        state_ids: int64 ``[B, K]`` the state before each turn (-1 unknown), or ``None``.
    """

    rewards: torch.Tensor
    mask: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    group_ids: Optional[torch.Tensor] = None
    boundary: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    turn_ids: Optional[torch.Tensor] = None
    turn_rewards: Optional[torch.Tensor] = None
    state_ids: Optional[torch.Tensor] = None


#: the :class:`CreditMethod` fields an advantage kind may read (and so may set to non-defaults)
_OPTION_DEFAULTS = {"scale": "std", "baseline": "mean", "gae_gamma": 1.0, "gae_lam": 1.0, "turn_gamma": 1.0,
                    "omega": 1.0}


@dataclass(frozen=True)
class Advantage:
    """A kind of advantage: how a batch's rewards become advantages, and what that needs.

    Args:
        name: the kind's name (``"group"``, ``"prefix_td"``, yours).
        fn: ``fn(method, batch) -> Tensor``: ``method`` is the :class:`CreditMethod` (read its
            ``scale``, ``baseline``, ``gae_gamma``, ``gae_lam``, ``turn_gamma``, ``omega``),
            ``batch`` a :class:`CreditBatch`;
            returns the advantages before the clamp: float ``[B]`` (one per completion) or
            ``[B, T]`` (per token, 0 at masked positions) as ``per_token`` says, dtype of
            ``batch.rewards``.
        per_token: ``fn`` returns ``[B, T]`` (else ``[B]``).
        needs_mask: ``fn`` reads ``batch.mask`` (always true when ``per_token``).
        needs_tokens: ``fn`` reads ``batch.tokens`` (the completion token ids).
        needs_entropy: ``fn`` reads ``batch.entropy``.
        boundary: ``fn`` accepts ``batch.boundary`` (step-level variants); otherwise giving one is
            a ``ValueError``.
        turns: ``fn`` reads the turn inputs ``batch.turn_ids`` and ``batch.turn_rewards`` (multi-turn
            credit). A kind without it that is given ``turn_rewards`` receives the undiscounted
            totals ``rewards + turn_rewards.sum(-1)`` as ``batch.rewards`` instead.
        needs_states: ``fn`` reads ``batch.state_ids`` and needs them (implies ``turns``); a kind
            without it given ``state_ids`` is a ``ValueError``.
        options: the :class:`CreditMethod` fields ``fn`` reads, among ``scale``, ``baseline``,
            ``gae_gamma``, ``gae_lam``, ``turn_gamma``, ``omega``; a method setting another of them
            away from its default is a ``ValueError`` (it would be ignored).
        description: one line for the docs.
    """

    name: str
    fn: Callable[["CreditMethod", CreditBatch], torch.Tensor]
    per_token: bool = False
    needs_mask: bool = False
    needs_tokens: bool = False
    needs_entropy: bool = False
    boundary: bool = False
    options: Tuple[str, ...] = ("scale",)
    description: str = ""
    turns: bool = False
    needs_states: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Advantage name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"Advantage fn must be callable fn(method, batch) -> Tensor, got {type(self.fn).__name__}")
        for k in ("per_token", "needs_mask", "needs_tokens", "needs_entropy", "boundary", "turns", "needs_states"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"Advantage {k} must be a bool, got {getattr(self, k)!r}")
        opts = tuple(self.options)
        bad = [o for o in opts if o not in _OPTION_DEFAULTS]
        if bad:
            raise ValueError(f"Advantage options must be among {tuple(_OPTION_DEFAULTS)}, got {bad}")
        object.__setattr__(self, "options", opts)
        if self.per_token:
            object.__setattr__(self, "needs_mask", True)
        if self.needs_states:
            object.__setattr__(self, "turns", True)


def _group_fn(method: "CreditMethod", b: CreditBatch) -> torch.Tensor:
    return F.group_advantage(b.rewards, b.group_size, scale=method.scale, baseline=method.baseline,
                             group_ids=b.group_ids)  # [B]


def _prefix_td_fn(method: "CreditMethod", b: CreditBatch) -> torch.Tensor:
    delta = F.prefix_td(b.tokens, b.mask, b.rewards, b.group_size, group_ids=b.group_ids, scale=method.scale,
                        boundary=b.boundary)  # [B, T]
    return F.traced_credit(delta, b.mask, method.gae_style)  # [B, T] GAE(gae_gamma, gae_lam)


_ADVANTAGES: Dict[str, Advantage] = {}
_LOCK = threading.Lock()


def register_advantage(kind: Advantage, *, overwrite: bool = False) -> Advantage:
    """Name an :class:`Advantage` so that methods can select it by ``advantage="name"``.

    (A :class:`CreditMethod` may also carry an unregistered :class:`Advantage` object.) The name
    is taken as written (``"prefix_td"``); registering another kind under a taken name is a
    ``ValueError`` unless ``overwrite=True``."""
    if not isinstance(kind, Advantage):
        raise ValueError(f"kind must be a creditlib.credit.Advantage, got {type(kind).__name__}")
    with _LOCK:
        if kind.name in _ADVANTAGES and not overwrite and _ADVANTAGES[kind.name] != kind:
            raise ValueError(f"advantage kind {kind.name!r} is already registered (pass overwrite=True to replace it)")
        _ADVANTAGES[kind.name] = kind
    return kind


def get_advantage(name: Union[str, Advantage]) -> Advantage:
    """The registered :class:`Advantage` called ``name`` (an ``Advantage`` is returned as is)."""
    if isinstance(name, Advantage):
        return name
    kind = _ADVANTAGES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"advantage must be one of {tuple(_ADVANTAGES)} or a creditlib.credit.Advantage, got {name!r}")
    return kind


def list_advantages() -> List[str]:
    """Names of the registered advantage kinds (built-ins: ``"group"``, ``"prefix_td"``)."""
    return list(_ADVANTAGES)


GROUP = register_advantage(Advantage(
    "group", _group_fn, options=("scale", "baseline"),
    description="group-relative advantage per completion (GRPO / RLOO / Dr. GRPO)"))
PREFIX_TD = register_advantage(Advantage(
    "prefix_td", _prefix_td_fn, per_token=True, needs_tokens=True, boundary=True,
    options=("scale", "gae_gamma", "gae_lam"),
    description="per-token GAE(gae_gamma, gae_lam) over the group prefix-tree TD error"))



def _treerl_fn(method: "CreditMethod", b: CreditBatch) -> torch.Tensor:
    return F.treerl_advantage(b.tokens, b.mask, b.rewards, b.group_size, group_ids=b.group_ids,
                            scale=method.scale)  # [B, T]


TREERL = register_advantage(Advantage(
    "treerl", _treerl_fn, per_token=True, needs_tokens=True, options=("scale",),
    description="TreeRL's global + local prefix-tree advantage over sqrt(leaves below), for tree rollouts"))


def _turn_fn(kind: str) -> Callable[["CreditMethod", CreditBatch], torch.Tensor]:
    """The advantage function of a turn kind: :func:`creditlib.functional.turn_credit` with the
    method's options; without ``turn_ids`` the turns are the runs of valid tokens (with
    ``boundary``: the steps, a new one after every boundary token)."""

    def fn(method: "CreditMethod", b: CreditBatch) -> torch.Tensor:
        turn_ids = b.turn_ids
        if turn_ids is None:
            turn_ids = F.turn_ids_from_mask(b.mask, b.boundary)  # [B, T]
        elif b.boundary is not None:
            raise ValueError(f"give turn_ids or boundary (steps cut from the mask), not both (credit method "
                             f"{method.name!r}): with turn_ids, end the steps there")
        return F.turn_credit(kind, turn_ids, b.turn_rewards, b.rewards, b.group_size, group_ids=b.group_ids,
                             state_ids=b.state_ids, tokens=b.tokens if kind == "prefix-turn" else None, mask=b.mask,
                             gamma=method.turn_gamma, omega=method.omega, gae_gamma=method.gae_gamma,
                             gae_lam=method.gae_lam, scale=method.scale)  # [B, T]

    fn.__name__ = fn.__qualname__ = f"_{kind.replace('-', '_')}_fn"
    return fn


TURN_GRPO = register_advantage(Advantage(
    "turn_grpo", _turn_fn("turn-grpo"), per_token=True, boundary=True, turns=True, options=("scale", "turn_gamma"),
    description="multi-turn: every turn gets its trajectory's group (leave-one-out) advantage of the return"))
TURN_INDEX = register_advantage(Advantage(
    "turn_index", _turn_fn("turn-index"), per_token=True, boundary=True, turns=True,
    options=("scale", "turn_gamma"),
    description="multi-turn (MT-GRPO): turn k's return against the other trajectories that reached turn k"))
ANCHOR_STATE = register_advantage(Advantage(
    "anchor_state", _turn_fn("anchor-state"), per_token=True, boundary=True, turns=True, needs_states=True,
    options=("scale", "turn_gamma", "omega"),
    description="GiGPO: episode advantage + omega x the turn's return against other trajectories' turns "
                "from the same state"))
PREFIX_TURN = register_advantage(Advantage(
    "prefix_turn", _turn_fn("prefix-turn"), per_token=True, needs_tokens=True, boundary=True, turns=True,
    options=("scale", "gae_gamma", "gae_lam"),
    description="multi-turn: the step-level prefix-tree TD error summed per turn, GAE(gae_gamma, gae_lam) over turns"))

#: the built-in advantage kinds (more can be registered: :func:`register_advantage`)
ADVANTAGES = ("group", "prefix_td", "treerl", "turn_grpo", "turn_index", "anchor_state", "prefix_turn")


def _total_rewards(rewards: torch.Tensor, mask: Optional[torch.Tensor], turn_ids: Optional[torch.Tensor],
                   turn_rewards: Optional[torch.Tensor]) -> torch.Tensor:
    """The rewards a kind that does not read turns sees: ``rewards + turn_rewards.sum(-1)`` (the
    undiscounted total), ``[B]``; ``turn_ids``, when given, checked against ``mask`` and the turns
    of ``turn_rewards``."""
    from .ops.turns._check import check_mask_agrees, check_turn_ids, check_turn_rewards

    rewards = check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if turn_ids is not None:
        ids, _, _ = check_turn_ids(turn_ids)  # [B, T]
        if mask is not None:
            check_mask_agrees(ids, mask)
        if turn_rewards is None:
            return rewards
        return F.turn_returns(ids, turn_rewards, rewards)[:, 0]  # [B] gamma = 1: the totals
    tr = check_turn_rewards(turn_rewards, rewards.shape[0], None, rewards.device)  # [B, K]
    dt = torch.promote_types(rewards.dtype, tr.dtype)
    return (rewards.to(torch.float64) + tr.to(torch.float64).sum(-1)).to(dt)  # [B]


_UNSET = object()
_RENAMED = {"gamma": "gae_gamma", "lam": "gae_lam"}  # CreditMethod(gamma=, lam=): GAE's, renamed


@dataclass(frozen=True, init=False)
class CreditMethod:
    """One credit-assignment configuration, selectable by ``name``.

    Args:
        name: registry name (``"grpo-lambda"``; registered as :func:`normalize_name` writes it:
            lower-case, ``-`` for ``_``).
        advantage: the :class:`Advantage` (or the name of a registered one): ``"group"``
            (per-sequence advantage ``[B]``, GRPO / RLOO) or ``"prefix_td"`` (per-token ``[B, T]``:
            GAE(gae_gamma, gae_lam) over the group prefix-tree TD error), or your own.
        scale: ``"std"`` (divide by the group std + 1e-4) or ``"none"`` (Dr. GRPO).
        baseline: ``"mean"`` (GRPO) or ``"loo"`` (RLOO); ``advantage="group"`` only (the prefix
            TD error is leave-one-out by construction).
        gae_gamma, gae_lam: GAE over the prefix TD error, in [0, 1]; ``advantage="prefix_td"``
            only (``gae_gamma = gae_lam = 1``: token ``k`` gets the RLOO advantage with a
            prefix-conditioned baseline). Not the trace's lambda: that is ``trace.lam``.
        clamp_min: negative-advantage clamp ``max(A, clamp_min)``: ``None`` or a finite float
            ``<= 0`` (the one clamp rule of the library).
        trace: the log-ratio style used inside the loss (``DecayStyle``), ``None`` for the plain
            token ratio.
        entropy_quantile: keep only the top ``entropy_quantile`` fraction of valid tokens by
            entropy in the loss (in (0, 1]); ``None`` keeps every valid token.
        description: one line for ``--help`` and the docs.
        turn_gamma: the discount over turns of a trajectory's returns ``G_{i,k} = sum_{k' >= k}
            turn_gamma^(k' - k) r_{i,k'}``, in [0, 1] (keyword only; the kinds ``"turn_grpo"``,
            ``"turn_index"``, ``"anchor_state"``).
        omega: weight of GiGPO's state advantage, a finite float ``>= 0`` (keyword only;
            ``advantage="anchor_state"``).

    ``gamma=`` / ``lam=`` (and the attributes ``.gamma`` / ``.lam``) are the deprecated names of
    ``gae_gamma`` / ``gae_lam``: they still work for one release, with a ``DeprecationWarning``.
    """

    name: str
    advantage: Union[str, Advantage] = "group"
    scale: str = "std"
    baseline: str = "mean"
    gae_gamma: float = 1.0
    gae_lam: float = 1.0
    clamp_min: Optional[float] = None
    trace: Optional[DecayStyle] = None
    entropy_quantile: Optional[float] = None
    description: str = ""
    turn_gamma: float = 1.0
    omega: float = 1.0

    def __init__(self, name: str, advantage: Union[str, Advantage] = "group", scale: str = "std",
                 baseline: str = "mean", gae_gamma: float = 1.0, gae_lam: float = 1.0,
                 clamp_min: Optional[float] = None, trace: Optional[DecayStyle] = None,
                 entropy_quantile: Optional[float] = None, description: str = "", *,
                 turn_gamma: float = 1.0, omega: float = 1.0, gamma=_UNSET, lam=_UNSET):
        if gamma is not _UNSET:
            deprecated_alias("CreditMethod(gamma=...)", "gae_gamma=... (the GAE discount)")
            gae_gamma = gamma
        if lam is not _UNSET:
            deprecated_alias("CreditMethod(lam=...)", "gae_lam=... (the GAE lambda; the trace's is trace.lam)")
            gae_lam = lam
        for k, v in (("name", name), ("advantage", advantage), ("scale", scale), ("baseline", baseline),
                     ("gae_gamma", gae_gamma), ("gae_lam", gae_lam), ("clamp_min", clamp_min), ("trace", trace),
                     ("entropy_quantile", entropy_quantile), ("description", description),
                     ("turn_gamma", turn_gamma), ("omega", omega)):
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        kind = get_advantage(self.advantage)
        # a registered kind is stored by name (so that equal methods compare equal and print short)
        object.__setattr__(self, "advantage", kind.name if _ADVANTAGES.get(kind.name) is kind else kind)
        check_scale(self.scale)
        check_baseline(self.baseline)
        object.__setattr__(self, "gae_gamma", check_unit("gae_gamma", self.gae_gamma))
        object.__setattr__(self, "gae_lam", check_unit("gae_lam", self.gae_lam))
        object.__setattr__(self, "turn_gamma", check_unit("turn_gamma", self.turn_gamma))
        object.__setattr__(self, "omega", check_eps(self.omega, "omega"))
        for opt, default in _OPTION_DEFAULTS.items():
            if opt not in kind.options and getattr(self, opt) != default:
                hint = (" (the prefix TD error is leave-one-out by construction)" if opt == "baseline" else "")
                users = [k.name for k in _ADVANTAGES.values() if opt in k.options]
                where = f"advantage={users[0]!r}" if len(users) == 1 else f"the advantage kinds {users}"
                raise ValueError(f"{opt}={getattr(self, opt)!r} applies to {where} only, not "
                                 f"advantage={kind.name!r}{hint}")
        object.__setattr__(self, "clamp_min", check_clamp_min(self.clamp_min))
        check_style(self.trace, allow_none=True, name="trace")
        if self.entropy_quantile is not None:
            object.__setattr__(self, "entropy_quantile", check_quantile(self.entropy_quantile, "entropy_quantile"))
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a string, got {type(self.description).__name__}")

    # ------------------------------------------------------------------ properties
    @property
    def advantage_kind(self) -> Advantage:
        """The :class:`Advantage` object (``advantage`` holds the name of a registered one)."""
        return get_advantage(self.advantage)

    @property
    def per_token(self) -> bool:
        """True when :meth:`advantages` returns per-token ``[B, T]`` advantages."""
        return self.advantage_kind.per_token

    @property
    def needs_tokens(self) -> bool:
        """True when :meth:`advantages` needs the completion token ids."""
        return self.advantage_kind.needs_tokens

    @property
    def needs_mask(self) -> bool:
        """True when :meth:`advantages` needs the completion mask."""
        return self.advantage_kind.needs_mask

    @property
    def needs_entropy(self) -> bool:
        """True when :meth:`advantages` or :meth:`loss_mask` needs per-token entropies."""
        return self.entropy_quantile is not None or self.advantage_kind.needs_entropy

    @property
    def turns(self) -> bool:
        """True when :meth:`advantages` reads the turn inputs (``turn_ids``, ``turn_rewards``)."""
        return self.advantage_kind.turns

    @property
    def needs_states(self) -> bool:
        """True when :meth:`advantages` needs ``state_ids`` (``advantage="anchor_state"``)."""
        return self.advantage_kind.needs_states

    @property
    def selects_tokens(self) -> bool:
        """True when :meth:`loss_mask` selects tokens by entropy (``entropy_quantile`` set)."""
        return self.entropy_quantile is not None

    @property
    def gae_style(self) -> DecayStyle:
        """``DecayStyle("recent", gae_gamma, gae_lam)``: GAE over the prefix TD error."""
        return DecayStyle("recent", gamma=self.gae_gamma, lam=self.gae_lam)

    @property
    def gamma(self) -> float:
        """Deprecated name of :attr:`gae_gamma`."""
        deprecated_alias("CreditMethod.gamma", "CreditMethod.gae_gamma")
        return self.gae_gamma

    @property
    def lam(self) -> float:
        """Deprecated name of :attr:`gae_lam` (the GAE lambda; the trace's lambda is ``trace.lam``)."""
        deprecated_alias("CreditMethod.lam", "CreditMethod.gae_lam")
        return self.gae_lam

    # ------------------------------------------------------------------ computation
    def raw_advantages(self, rewards: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                       tokens: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                       group_ids: Optional[torch.Tensor] = None, boundary: Optional[torch.Tensor] = None,
                       entropy: Optional[torch.Tensor] = None, turn_ids: Optional[torch.Tensor] = None,
                       turn_rewards: Optional[torch.Tensor] = None,
                       state_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`advantages` before the clamp (what :class:`creditlib.modules.CreditAdvantage` writes)."""
        kind = self.advantage_kind
        if mask is not None:
            mask = as_bool_mask(mask)
        if boundary is not None and not kind.boundary:
            raise ValueError(f"boundary applies to advantage kinds that take step boundaries ('prefix_td' and the "
                             f"turn kinds), not advantage={kind.name!r} (credit method {self.name!r})")
        for need, value, what in ((kind.needs_tokens, tokens, "tokens: the completion token ids [B, T]"),
                                  (kind.needs_mask, mask, "mask: bool [B, T] completion tokens"),
                                  (kind.needs_entropy, entropy, "entropy: the per-token policy entropy [B, T]")):
            if need and value is None:
                raise ValueError(f"credit method {self.name!r} (advantage={kind.name!r}) needs {what}")
        if kind.needs_states and state_ids is None:
            raise ValueError(f"credit method {self.name!r} needs state_ids: int64 [B, K], the id of the environment "
                             f"state before each turn (-1 unknown), so that turns from the same state are compared "
                             f"(advantage={kind.name!r})")
        if state_ids is not None and not kind.turns:
            raise ValueError(f"state_ids applies to the turn kinds that read states ('anchor_state'), not "
                             f"advantage={kind.name!r} (credit method {self.name!r}): it would be ignored")
        if not kind.turns and (turn_ids is not None or turn_rewards is not None):
            rewards = _total_rewards(rewards, mask, turn_ids, turn_rewards)  # [B]
            turn_ids = turn_rewards = None
        batch = CreditBatch(rewards, mask, tokens, group_size, group_ids, boundary, entropy, turn_ids, turn_rewards,
                            state_ids)
        adv = kind.fn(self, batch)
        if not isinstance(adv, torch.Tensor):
            raise ValueError(f"advantage {kind.name!r} returned {type(adv).__name__}, expected a tensor")
        B = rewards.shape[0] if isinstance(rewards, torch.Tensor) and rewards.dim() else 0
        want = tuple(mask.shape) if kind.per_token else (B,)
        if tuple(adv.shape) != want:
            raise ValueError(f"advantage {kind.name!r} returned shape {tuple(adv.shape)}, expected {want} "
                             f"({'per_token' if kind.per_token else 'per sequence'})")
        return adv

    def advantages(self, rewards: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                   tokens: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                   group_ids: Optional[torch.Tensor] = None,
                   boundary: Optional[torch.Tensor] = None,
                   entropy: Optional[torch.Tensor] = None, turn_ids: Optional[torch.Tensor] = None,
                   turn_rewards: Optional[torch.Tensor] = None,
                   state_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advantages of a batch of completions, clamp included.

        Args:
            rewards: float ``[B]``.
            mask: bool or integer (nonzero = valid) ``[B, T]`` completion tokens (required by
                per-token kinds, e.g. ``advantage="prefix_td"``).
            tokens: int ``[B, T]`` completion token ids (kinds with ``needs_tokens``).
            group_size / group_ids: the groups, as in :func:`creditlib.functional.group_advantage`.
            boundary: optional bool ``[B, T]`` step ends (step-level prefix TD; for the turn kinds
                without ``turn_ids``: a new turn after every boundary token).
            entropy: float ``[B, T]`` (kinds with ``needs_entropy``).
            turn_ids: int64 ``[B, T]`` the turn of each valid token (-1 elsewhere; True exactly where
                ``mask`` is); the turn kinds default to the runs of valid tokens.
            turn_rewards: float ``[B, K]`` the reward after each turn (0 where none). A kind that
                does not read turns uses ``rewards + turn_rewards.sum(-1)`` as its rewards.
            state_ids: int64 ``[B, K]`` the state before each turn, -1 unknown (kinds with
                ``needs_states``: ``"anchor_state"``; any other kind raises).
        Returns:
            ``[B]`` (per-sequence kinds, ``advantage="group"``) or ``[B, T]`` (per-token kinds,
            ``"prefix_td"``, the turn kinds; 0 at masked positions), dtype of ``rewards``
            (promoted with ``turn_rewards``).
        """
        adv = self.raw_advantages(rewards, mask, tokens=tokens, group_size=group_size, group_ids=group_ids,
                                  boundary=boundary, entropy=entropy, turn_ids=turn_ids, turn_rewards=turn_rewards,
                                  state_ids=state_ids)
        if self.clamp_min is not None:
            adv = adv.clamp_min(self.clamp_min)  # masked zeros stay 0 (clamp_min <= 0)
        return adv

    def loss_mask(self, mask: torch.Tensor, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[B, T]`` mask of the tokens that enter the loss.

        ``mask`` (as bool: integer masks are accepted) when ``entropy_quantile`` is None
        (``entropy`` is then ignored), else ``F.entropy_mask(entropy, mask, entropy_quantile)``
        (the top-entropy "forking" tokens).
        """
        mask = as_bool_mask(mask)
        if self.entropy_quantile is None:
            return mask
        if entropy is None:
            raise ValueError(f"credit method {self.name!r} (entropy_quantile={self.entropy_quantile}) needs "
                             "entropy: the per-token policy entropy [B, T]")
        return F.entropy_mask(entropy, mask, self.entropy_quantile)

    def replace(self, **changes) -> "CreditMethod":
        """A copy with some fields changed (validated again), e.g. ``m.replace(clamp_min=-0.2)``.

        The copy is not registered; give it a new ``name`` and call :func:`register_credit` to
        make it selectable by name. (``gamma=`` / ``lam=`` are the deprecated names of
        ``gae_gamma=`` / ``gae_lam=``.)
        """
        for old, new in _RENAMED.items():
            if old in changes:
                deprecated_alias(f"CreditMethod.replace({old}=...)", f"{new}=...")
                changes[new] = changes.pop(old)
        return _dc_replace(self, **changes)

    def summary(self) -> str:
        """Compact one-line form of the non-default fields (for logs)."""
        kind = self.advantage_kind
        parts = [f"advantage={kind.name}", f"scale={self.scale}"]
        if "baseline" in kind.options:
            parts.append(f"baseline={self.baseline}")
        if "gae_gamma" in kind.options or "gae_lam" in kind.options:
            parts.append(f"gae_gamma={self.gae_gamma:g}, gae_lam={self.gae_lam:g}")
        if "turn_gamma" in kind.options:
            parts.append(f"turn_gamma={self.turn_gamma:g}")
        if "omega" in kind.options:
            parts.append(f"omega={self.omega:g}")
        if self.clamp_min is not None:
            parts.append(f"clamp_min={self.clamp_min:g}")
        if self.trace is not None:
            parts.append(f"trace={self.trace}")
        if self.entropy_quantile is not None:
            parts.append(f"entropy_quantile={self.entropy_quantile:g}")
        return f"{self.name}: " + ", ".join(parts)


# ----------------------------------------------------------------------------- the registry
_REGISTRY: Dict[str, CreditMethod] = {}


def register_credit(method: CreditMethod, *, overwrite: bool = False) -> CreditMethod:
    """Add a credit method to the registry: one call makes it selectable everywhere by name.

    Example::

        from creditlib import DecayStyle
        from creditlib.credit import CreditMethod, register_credit
        register_credit(CreditMethod("rloo-lambda", baseline="loo", clamp_min=-0.1,
                                     trace=DecayStyle("recent", lam=0.9),
                                     description="RLOO baseline, clamp, lambda=0.9 trace"))
        # now: recipe --credit rloo-lambda, get_credit("rloo-lambda"), the TRL/verl adapters ...

    A new kind of advantage needs no other edit: give the method an :class:`Advantage` (the
    function and what it needs) and every layer reads it from here (module docstring).

    Args:
        method: the :class:`CreditMethod`. Its ``name`` is normalised (:func:`normalize_name`:
            ``" My_Method"`` is registered as ``"my-method"``), and the registered method carries
            the normalised name.
        overwrite: replace an existing method of the same normalised name (otherwise a
            ``ValueError``, unless it is the same method).
    Returns:
        the registered method (``method``, renamed to the normalised name if needed).
    """
    if not isinstance(method, CreditMethod):
        raise ValueError(f"method must be a creditlib.credit.CreditMethod, got {type(method).__name__}")
    key = normalize_name(method.name)
    if key != method.name:
        method = _dc_replace(method, name=key)
    with _LOCK:
        if key in _REGISTRY and not overwrite and _REGISTRY[key] != method:
            raise ValueError(f"credit method {key!r} is already registered "
                             "(pass overwrite=True to replace it)")
        _REGISTRY[key] = method
    return method


def get_credit(name: str) -> CreditMethod:
    """The registered credit method called ``name``.

    Raises:
        ValueError: unknown name (the message lists the close matches and every name).
    """
    if isinstance(name, CreditMethod):
        return name
    if not isinstance(name, str):
        raise ValueError(f"credit method name must be a string, got {type(name).__name__}")
    m = _REGISTRY.get(name)
    if m is None and name.strip():
        m = _REGISTRY.get(normalize_name(name))
    if m is None:
        close = difflib.get_close_matches(name.strip().lower().replace("_", "-"), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown credit method {name!r}{hint} Known: {', '.join(list_credits())}")
    return m


def list_credits() -> List[str]:
    """Names of the registered credit methods, in registration order (built-ins first)."""
    return list(_REGISTRY)


# ----------------------------------------------------------------------------- built-ins
_LAMBDA = DecayStyle("recent", gamma=1.0, lam=0.99)

for _m in (
    CreditMethod("grpo", description="GRPO: group-normalised sequence advantage, plain token ratio"),
    CreditMethod("clamp", clamp_min=-0.1,
                 description="GRPO with the negative-advantage clamp max(A, -0.1)"),
    CreditMethod("grpo-lambda", clamp_min=-0.1, trace=_LAMBDA,
                 description="GRPO-lambda: decayed eligibility trace (recent, lam 0.99) + clamp -0.1"),
    CreditMethod("grpo-lambda-norm", clamp_min=-0.1,
                 trace=DecayStyle("recent", gamma=1.0, lam=0.99, normalize=True),
                 description="GRPO-lambda with row-normalised trace weights (no early-token blow-up) + clamp -0.1"),
    CreditMethod("gspo", trace=DecayStyle("sequence"),
                 description="GSPO: every token carries the sequence-level mean log-ratio"),
    CreditMethod("prefix-gae", advantage="prefix_td",
                 description="per-token RLOO advantage with a prefix-tree baseline (GAE gamma=lam=1)"),
    CreditMethod("prefix-gae-clamp", advantage="prefix_td", clamp_min=-0.1,
                 description="prefix-gae with the negative-advantage clamp max(A, -0.1)"),
    CreditMethod("prefix-gae-lambda", advantage="prefix_td", gae_lam=0.95,
                 description="GAE(gamma=1, lam=0.95) over the prefix-tree TD error"),
    CreditMethod("entropy-80-20", entropy_quantile=0.2,
                 description="GRPO on the top-20% entropy (forking) tokens only"),
    CreditMethod("treerl", advantage="treerl", scale="none",
                 description="TreeRL (arXiv 2506.11902): global + local prefix-tree advantage / sqrt(leaves below); "
                             "meant for tree rollouts"),
    CreditMethod("turn-grpo", advantage="turn_grpo",
                 description="multi-turn GRPO: every turn gets its trajectory's leave-one-out group advantage"),
    CreditMethod("turn-index", advantage="turn_index",
                 description="multi-turn, MT-GRPO grouping: turn k's return against the others that reached turn k"),
    CreditMethod("anchor-state", advantage="anchor_state",
                 description="GiGPO (arXiv 2505.10978): episode advantage + omega 1 x the return against other "
                             "trajectories' turns from the same state (needs state_ids)"),
    CreditMethod("prefix-turn", advantage="prefix_turn",
                 description="multi-turn prefix-tree TD error per turn, GAE(1, 1): (R - V(turn start)) / s"),
):
    register_credit(_m)
del _m
