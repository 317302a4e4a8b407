"""Every creditlib credit method inside Hugging Face TRL's ``GRPOTrainer`` (extra: ``pip install 'creditlib[trl]'``).

Select a method of the registry (:mod:`creditlib.credit`) by name::

    from creditlib.integrations.trl import CreditConfig, CreditTrainer

    args = CreditConfig(output_dir="out", credit="prefix-gae")      # or "grpo-lambda", "gspo", ...
    trainer = CreditTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()

or keep GRPO-lambda's own fields (unchanged since the first release)::

    from creditlib.integrations.trl import GRPOLambdaConfig, GRPOLambdaTrainer
    args = GRPOLambdaConfig(output_dir="out", trace_style="recent", trace_lam=0.99, clamp_min=-0.1)

What a :class:`~creditlib.credit.CreditMethod` changes in TRL's ``GRPOTrainer`` (nothing else does):

1. **Advantages** (``_generate_and_score_completions``, where TRL has the completion ids).
   ``advantage="group"`` with the mean baseline: TRL's own group-relative advantage (its
   ``scale_rewards``). ``baseline="loo"`` (RLOO) and ``advantage="prefix_td"`` (prefix-tree TD error
   with GAE): creditlib computes them from TRL's rewards (the weighted sum of the reward functions,
   gathered over processes) and, for the prefix tree, the completion token ids; the prefix methods
   hand TRL per-token ``[B, T]`` advantages, which TRL's loss accepts as they are. Completions that
   every reward function declined to score (TRL's unscorable rows) get advantage 0 and stay out of
   the other completions' baselines, as in TRL. Then the clamp ``A <- max(A, clamp_min)``.
2. **Log-ratio** (``trace``): inside TRL's ``_compute_loss`` the per-token log-ratio
   ``x_t = log pi_theta(o_t) - log pi_old(o_t)`` (mask = completion mask x tool mask) becomes
   ``z = F.eligibility_trace(x, mask, trace)``: GRPO-lambda's decayed trace, its row-normalised
   form, or GSPO's sequence-level mean log-ratio (``DecayStyle("sequence")``). Every TRL
   ``loss_type`` then runs on ``z``.
3. **Tokens in the loss** (``entropy_quantile``): TRL's own ``top_entropy_quantile``, which keeps
   the same tokens as :func:`creditlib.functional.entropy_mask` (tested).

How the trace is applied: TRL's ``_compute_loss`` computes ``log_ratio = per_token_logps -
old_per_token_logps``. The trainer overrides ``_get_per_token_logps_and_entropies`` and, during the
loss only, returns ``old + z`` in place of ``log pi_theta``, so TRL's own subtraction yields ``z``.
The reference KL term and the off-policy sequence mask still see the true ``log pi_theta`` (their
inputs are shifted by the same amount, with the gradient of ``log pi_theta``); the entropies are
untouched. If a TRL version stops routing the loss through that method, or never calls
``_calculate_rewards`` before a method that needs the rewards, the trainer raises instead of
silently training plain GRPO. TRL's fused Liger GRPO loss (``use_liger_loss``, which bypasses
``_compute_loss``) and ``AsyncGRPOTrainer`` (its own packed loss and rollout-worker advantages, not
a ``GRPOTrainer``) are refused with a ``ValueError`` that says why.

Multi-turn environments (TRL's ``environment_factory`` / ``tools``) with per-turn credit
(``credit="turn-grpo"``, ``"turn-index"``, ``"anchor-state"``, ``"prefix-turn"``)::

    trainer = CreditTrainer(model=..., args=CreditConfig(..., credit="anchor-state"),
                            train_dataset=..., environment_factory=MyEnv)

The policy's turns are the runs of completion tokens outside TRL's ``tool_mask`` (tool results and
padding get advantage 0). TRL 1.16 carries one scalar reward per completion to its advantage step;
per-turn rewards and state ids come from the per-rollout environment instances TRL hands its
reward functions (``environments``), by a creditlib convention: an environment may hold
``turn_rewards`` (entry ``k``: the reward of the policy's turn ``k``, the first generation being
turn 0) and ``state_ids`` (entry ``k``: an int id of the state before turn ``k``, ``-1`` unknown),
both plain attributes (or properties: TRL exposes every public *method* as a tool), refilled by
``reset()``. TRL's rewards (``reward_funcs`` and ``get_reward``) are the outcome reward, added to
the last turn. See :meth:`CreditMixin._creditlib_turn_advantages` for the exact rules and
``docs/trl.md`` ("Multi-turn environments and per-turn credit") for what TRL cannot carry.

Tree rollouts (:mod:`creditlib.rl.tree`) through TRL's ``rollout_func``, with any credit method::

    trainer = CreditTrainer(..., args=CreditConfig(..., credit="prefix-gae", num_generations=8),
                            rollout_func=tree_rollout_func(TreeSpec()))   # 8 leaves per prompt

(:class:`TreeRolloutFunc` says what TRL's ``rollout_func`` carries and what it cannot.)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._extras import require

require("trl", "creditlib.integrations.trl")  # trl>=1.0,<2 and accelerate

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from .. import functional as F
from .._validation import check_clamp_min
from ..credit import CreditMethod, get_credit, list_credits
from ..losses.functional import clamp_advantages
from ..style import STYLES, DecayStyle

__all__ = ["CreditConfig", "CreditMixin", "CreditTrainer", "GRPOLambdaConfig", "GRPOLambdaMixin",
           "GRPOLambdaTrainer", "TreeRolloutFunc", "tree_rollout_func"]


def _check_clamp_min(clamp_min) -> Optional[float]:
    return check_clamp_min(clamp_min, "clamp_min")


def _computes_own_advantages(method: CreditMethod) -> bool:
    """True when creditlib (not TRL) computes the advantages: any advantage kind but TRL's own group
    mean baseline (per-token kinds such as prefix TD or TreeRL, RLOO, registered kinds)."""
    return method.advantage_kind.name != "group" or method.baseline != "mean"


def _is_turn_method(method: CreditMethod) -> bool:
    """True for the turn kinds (``turn-grpo``, ``turn-index``, ``anchor-state``, ``prefix-turn``, or
    a registered kind with ``turns=True``): advantages per policy turn, from turn ids, per-turn
    rewards and (``needs_states``) state ids."""
    return bool(getattr(method.advantage_kind, "turns", False))


def _needs_states(method: CreditMethod) -> bool:
    return bool(getattr(method.advantage_kind, "needs_states", False))


#: the environment attributes creditlib reads (see CreditMixin._creditlib_turn_advantages)
ENV_TURN_REWARDS = "turn_rewards"
ENV_STATE_IDS = "state_ids"


def _env_sequence(env, attr: str, row: int) -> Optional[list]:
    """``env.<attr>`` as a list (``None`` when the environment has no such attribute, or it is None)."""
    value = getattr(env, attr, None)
    if value is None:
        return None
    where = f"environment {type(env).__name__} of row {row}"
    if callable(value):
        raise ValueError(
            f"{where}: {attr} is a method; creditlib reads {attr} as a plain attribute or a property (a list), "
            "because TRL exposes every public method of an environment to the model as a tool")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{where}: {attr} must be one-dimensional (one entry per turn), got shape "
                             f"{tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{where}: {attr} must be a list (one entry per turn), got {type(value).__name__}")
    return list(value)


def _check_turn_rewards(values: list, env, row: int, turns: int) -> list:
    """Floats, finite; entries past the row's ``turns`` policy turns must be 0 (then dropped)."""
    where = f"environment {type(env).__name__} of row {row}"
    out = []
    for k, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numbers.Real: numpy floats too
            raise ValueError(f"{where}: turn_rewards[{k}] must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{where}: turn_rewards[{k}] = {v} is not finite")
        out.append(v)
    if turns > 0 and any(v != 0.0 for v in out[turns:]):
        raise ValueError(
            f"{where}: turn_rewards has {len(out)} entries {_short(out)} but the row has {turns} policy turn(s) "
            "(runs of completion tokens outside TRL's tool mask); entry k must be the reward of the policy's "
            "turn k, one entry per turn (several tool calls in one turn add into one entry; did reset() clear "
            "the list?)")
    return out


def _short(values: list, n: int = 8) -> str:
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ...]"


def _n_turns(turn_ids: torch.Tensor) -> torch.Tensor:
    """``K_i`` (int64 ``[B]``): turns per row of ``turn_ids [B, T]`` (0 for a row without a valid token)."""
    if turn_ids.shape[1] == 0:
        return torch.zeros(turn_ids.shape[0], dtype=torch.int64, device=turn_ids.device)
    return (turn_ids.max(dim=1).values + 1).clamp(min=0)


def _check_state_ids(values: list, env, row: int) -> list:
    where = f"environment {type(env).__name__} of row {row}"
    out = []
    for k, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < -1:  # numpy ints too
            raise ValueError(f"{where}: state_ids[{k}] must be an int >= -1 (an id of the state before turn "
                             f"{k}, -1 unknown), got {v!r}; map states to ints with a stable hash shared by "
                             "every process")
        out.append(int(v))
    return out


def _reconcile(cfg, method: CreditMethod) -> None:
    """Make TRL's own options agree with ``method``, or raise a ValueError naming both."""
    if method.advantage_kind.needs_entropy:
        raise ValueError(f"credit method {method.name!r} computes its advantages from per-token entropies, which "
                         "TRL's GRPOTrainer does not have at its advantage step; use it in the recipe or TorchRL")
    q = method.entropy_quantile
    if q is not None:
        if cfg.top_entropy_quantile == 1.0:
            cfg.top_entropy_quantile = q  # TRL's own mask keeps the same tokens as F.entropy_mask
        elif cfg.top_entropy_quantile != q:
            raise ValueError(
                f"top_entropy_quantile={cfg.top_entropy_quantile} contradicts credit method {method.name!r} "
                f"(entropy_quantile={q}): leave top_entropy_quantile at 1.0 or set it to {q}")
    scale_rewards = cfg.scale_rewards
    if method.scale == "none":
        if scale_rewards not in ("none", "group"):
            raise ValueError(f"scale_rewards={scale_rewards!r} contradicts credit method {method.name!r} "
                             "(scale='none': no division by the reward std)")
        cfg.scale_rewards = "none"
    elif scale_rewards == "none":
        raise ValueError(f"scale_rewards='none' contradicts credit method {method.name!r} (scale='std'); "
                         "register a variant with method.replace(name=..., scale='none') instead")
    if _computes_own_advantages(method):
        if scale_rewards == "batch":
            raise ValueError(f"scale_rewards='batch' cannot be combined with credit method {method.name!r}: "
                             "its advantages are computed by creditlib per group (scale 'group' or 'none')")
        if cfg.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={cfg.multi_objective_aggregation!r} cannot be combined with credit "
                f"method {method.name!r}: creditlib takes the weighted sum of the reward functions as the "
                "reward ('sum_then_normalize')")


def _resolve_checkpointing(cfg) -> None:
    """TRL's ``_BaseConfig`` defaults the deprecated ``gradient_checkpointing`` to True, so every TRL
    config triggers transformers' FutureWarning (``gradient_checkpointing`` is deprecated, use
    ``activation_checkpointing``). creditlib's configs default both to ``None`` and set the new name
    to TRL's default (True) here, before transformers reads them: same behaviour, no warning. A user
    who sets either name explicitly gets exactly what transformers does with it."""
    if getattr(cfg, "activation_checkpointing", None) is None and getattr(cfg, "gradient_checkpointing", None) is None:
        cfg.activation_checkpointing = True


_TRL_CHECKPOINTING_NAMES = r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"

_CHECKPOINTING_HELP = ("Recompute activations in the backward pass to save memory (TRL's default: True). "
                       "Set this, not the deprecated gradient_checkpointing.")


@dataclass
class CreditConfig(GRPOConfig):
    r"""TRL's :class:`~trl.GRPOConfig` plus ``credit``: the name of a creditlib credit method.

    Every ``GRPOConfig`` field keeps its meaning. ``credit`` selects a
    :class:`~creditlib.credit.CreditMethod` from the registry (``creditlib.credit.list_credits()``:
    ``grpo``, ``clamp``, ``grpo-lambda``, ``grpo-lambda-norm``, ``gspo``, ``prefix-gae``,
    ``prefix-gae-clamp``, ``prefix-gae-lambda``, ``entropy-80-20``, the turn methods ``turn-grpo``,
    ``turn-index``, ``anchor-state``, ``prefix-turn`` (multi-turn environments: see the module
    docstring), and any method registered with :func:`creditlib.credit.register_credit`: that is
    how to change a method's parameters).

    The method's choices that TRL already has are written into TRL's fields here:
    ``entropy_quantile`` sets ``top_entropy_quantile`` (left at 1.0 or equal, else ``ValueError``)
    and ``scale="none"`` sets ``scale_rewards="none"``. Contradictory settings raise ``ValueError``.

    Parameters:
        credit (`str`, defaults to `"grpo-lambda"`):
            Name of the credit method.
    """

    credit: str = field(
        default="grpo-lambda",
        metadata={"help": "Credit-assignment method of creditlib's registry (creditlib.credit.list_credits()): "
                          "grpo, clamp, grpo-lambda, grpo-lambda-norm, gspo, prefix-gae, prefix-gae-clamp, "
                          "prefix-gae-lambda, entropy-80-20, turn-grpo, turn-index, anchor-state, prefix-turn, "
                          "or a registered name."},
    )
    activation_checkpointing: Optional[bool] = field(default=None, metadata={"help": _CHECKPOINTING_HELP})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers v5)."})

    def __post_init__(self):
        _resolve_checkpointing(self)
        super().__post_init__()
        _reconcile(self, self.credit_method())

    def credit_method(self) -> CreditMethod:
        """The registered :class:`~creditlib.credit.CreditMethod` named ``credit``."""
        if not isinstance(self.credit, str):
            raise ValueError(f"credit must be the name of a registered credit method ({', '.join(list_credits())}), "
                             f"got {type(self.credit).__name__}; register a custom method with "
                             "creditlib.credit.register_credit and pass its name")
        try:
            return get_credit(self.credit)
        except ValueError as e:
            raise ValueError(f"credit: {e}") from None


@dataclass
class GRPOLambdaConfig(GRPOConfig):
    r"""TRL's :class:`~trl.GRPOConfig` plus the GRPO-lambda fields (arXiv 2510.00194).

    Every ``GRPOConfig`` field keeps its meaning (``loss_type``, ``epsilon``, ``beta``,
    ``importance_sampling_level``, ...). The added fields:

    Parameters:
        trace_style (`str`, defaults to `"recent"`):
            Eligibility-trace weights ``w(t, j)`` over the per-token log-ratios: `"recent"`
            (``d^(t-j)``, the accumulating trace), `"both"` (``max(d^(t-j), d^j)``: credit to the
            latest and to the earliest tokens) or `"sequence"` (GSPO's mean log-ratio), with
            ``d = trace_gamma * trace_lam``.
        trace_gamma (`float`, defaults to `1.0`):
            Discount ``gamma`` in [0, 1].
        trace_lam (`float`, defaults to `0.99`):
            Trace decay ``lambda`` in [0, 1]. ``trace_gamma * trace_lam = 0`` with `"recent"` and no
            floor is plain GRPO.
        trace_eps (`float`, defaults to `0.0`):
            Weight floor in [0, 1]: ``w(t, j) = max(w(t, j), trace_eps)`` for ``j <= t`` (0 = none).
        trace_normalize (`bool`, defaults to `False`):
            Row-normalised weights ``w(t, j) / sum_{i<=t} w(t, i)`` (``z_t`` is a weighted mean).
        clamp_min (`float` or `None`, defaults to `-0.1`):
            Negative-advantage clamp ``A <- max(A, clamp_min)``, a float ``<= 0``; `None` disables it.
    """

    trace_style: str = field(
        default="recent",
        metadata={"help": "Eligibility-trace weights: 'recent' (d^(t-j)), 'both' (max(d^(t-j), d^j)) or 'sequence' "
                          "(GSPO's mean log-ratio), d = trace_gamma * trace_lam.", "choices": list(STYLES)},
    )
    trace_gamma: float = field(default=1.0, metadata={"help": "Discount gamma in [0, 1] of the trace."})
    trace_lam: float = field(
        default=0.99,
        metadata={"help": "Trace decay lambda in [0, 1]; trace_gamma * trace_lam = 0 is plain GRPO."},
    )
    trace_eps: float = field(
        default=0.0, metadata={"help": "Weight floor in [0, 1] of the trace (0 disables it)."})
    trace_normalize: bool = field(
        default=False, metadata={"help": "Row-normalise the trace weights (z_t is a weighted mean of log-ratios)."})
    clamp_min: Optional[float] = field(
        default=-0.1,
        metadata={"help": "Negative-advantage clamp A <- max(A, clamp_min), a float <= 0; None disables it."},
    )
    activation_checkpointing: Optional[bool] = field(default=None, metadata={"help": _CHECKPOINTING_HELP})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers v5)."})

    def __post_init__(self):
        _resolve_checkpointing(self)
        super().__post_init__()
        self.decay_style()  # validate early, with the config's field names
        self.clamp_min = _check_clamp_min(self.clamp_min)

    def decay_style(self) -> DecayStyle:
        """The :class:`creditlib.DecayStyle` these fields describe."""
        try:
            return DecayStyle(self.trace_style, self.trace_gamma, self.trace_lam, self.trace_eps,
                              normalize=self.trace_normalize)
        except ValueError as e:  # name the config fields, not DecayStyle's arguments
            msg = str(e)
            for name in ("style", "gamma", "lam", "eps", "normalize"):
                if msg.startswith(name + " "):
                    msg = "trace_" + msg
                    break
            raise ValueError(msg) from None

    def credit_method(self) -> CreditMethod:
        """The unregistered :class:`~creditlib.credit.CreditMethod` these fields describe."""
        return CreditMethod("grpo-lambda (GRPOLambdaConfig)", clamp_min=self.clamp_min, trace=self.decay_style(),
                            scale="none" if self.scale_rewards == "none" else "std",  # TRL's own advantage
                            description="GRPO-lambda from GRPOLambdaConfig's trace_* and clamp_min fields")


class _TraceState:
    """What the loss override hands to the log-prob override for one ``_compute_loss`` call."""

    __slots__ = ("inputs", "mask", "applied")

    def __init__(self, inputs: dict, mask: torch.Tensor):
        self.inputs = inputs  # a shallow copy of TRL's batch dict
        self.mask = mask  # [B, T] bool: completion mask x tool mask
        self.applied = False


_ASYNC_REFUSAL = (
    "creditlib cannot apply a credit method to {name}: it is not a trl.GRPOTrainer. TRL's AsyncGRPOTrainer "
    "computes one float advantage per sample in its background rollout worker and its loss from packed "
    "log-probs in its own compute_loss, with no step where creditlib could set per-token advantages or "
    "the traced log-ratio; training it would silently skip the credit assignment. Use GRPOTrainer "
    "(CreditTrainer / GRPOLambdaTrainer).")


class CreditMixin:
    """A creditlib credit method on top of any ``trl.GRPOTrainer`` (sub)class: put it first in the bases.

    The method comes from the trainer's ``args``: a :class:`CreditConfig` (``credit`` = a registry
    name) or a :class:`GRPOLambdaConfig`. Overrides ``_calculate_rewards`` (keeps the rewards and
    the per-rollout environments), ``_generate_and_score_completions`` (advantages and clamp;
    per-turn advantages for the turn methods), ``_compute_loss`` and
    ``_get_per_token_logps_and_entropies`` (the log-ratio style), each calling ``super()``. These
    four private methods of TRL's ``GRPOTrainer`` are the whole override surface (tested with trl
    1.16.0, transformers 5.24.0).

    Attributes:
        credit_method: the :class:`~creditlib.credit.CreditMethod` in use.
        trace_style: its log-ratio :class:`creditlib.DecayStyle` (``None``: the plain ratio).
        clamp_min: the advantage floor, or ``None``.
    """

    _default_config = CreditConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if GRPOTrainer in mro and mro.index(GRPOTrainer) < mro.index(CreditMixin):
            bases = ", ".join(b.__name__ for b in cls.__bases__)
            mixin = next(b for b in mro if issubclass(b, CreditMixin) and b is not cls).__name__
            raise TypeError(
                f"class {cls.__name__}({bases}): {mixin} must come before GRPOTrainer in the bases, e.g. "
                f"class {cls.__name__}({mixin}, GRPOTrainer). In this order "
                "GRPOTrainer's own methods would shadow the mixin's and the run would silently train plain GRPO, "
                "whatever the credit method.")

    def __init__(self, *args, **kwargs):
        if not isinstance(self, GRPOTrainer):
            raise ValueError(_ASYNC_REFUSAL.format(name=type(self).__name__))
        cfg = kwargs.get("args", args[2] if len(args) > 2 else None)
        if cfg is None:
            model = kwargs.get("model", args[0] if args else None)
            config = getattr(model, "config", None)
            name = model if isinstance(model, str) else getattr(config, "_name_or_path", "model")
            cfg = self._default_config(f"{str(name).split('/')[-1] or 'model'}-creditlib")
            if "args" in kwargs or len(args) <= 2:
                kwargs["args"] = cfg
            else:
                args = args[:2] + (cfg,) + args[3:]
        if not isinstance(cfg, (CreditConfig, GRPOLambdaConfig)):
            raise ValueError(
                f"args must be a creditlib.integrations.trl.CreditConfig (TRL's GRPOConfig plus credit=NAME) or "
                f"GRPOLambdaConfig (GRPOConfig plus trace_style, trace_gamma, trace_lam, trace_eps, clamp_min), "
                f"got {type(cfg).__name__}")
        # TRL < 1.0 had a fused Liger GRPO loss that replaces `_compute_loss`: the trace would be skipped.
        if getattr(cfg, "use_liger_loss", False) or (
                getattr(cfg, "use_liger_kernel", False) and hasattr(GRPOTrainer, "compute_liger_loss")):
            raise ValueError(
                "creditlib cannot run on TRL's Liger GRPO loss (use_liger_loss / use_liger_kernel with a TRL "
                "that has compute_liger_loss): it bypasses GRPOTrainer._compute_loss, where the advantages and "
                "the log-ratio style are applied. Set use_liger_loss=False / use_liger_kernel=False.")
        method = cfg.credit_method()
        _reconcile(cfg, method)  # again: args may have been edited after construction
        tree = kwargs.get("rollout_func")
        if isinstance(tree, TreeRolloutFunc):  # refuse a tree that cannot fill TRL's groups before building
            tree.check_config(cfg)
            for name in ("tools", "environment_factory"):
                if kwargs.get(name):
                    raise ValueError(f"{name} cannot be combined with a tree rollout_func: {_TOOLS_REFUSAL}")
        self.credit_method: CreditMethod = method
        self.trace_style: Optional[DecayStyle] = method.trace
        self.clamp_min: Optional[float] = method.clamp_min
        if _needs_states(method) and not kwargs.get("environment_factory"):
            raise ValueError(
                f"credit method {method.name!r} needs state_ids (an id of the environment state before each "
                "turn), and TRL's GRPOTrainer carries nothing but one scalar reward per completion to its "
                "advantage step: creditlib reads them from the environments of environment_factory=..., each "
                f"holding a `{ENV_STATE_IDS}` list (entry k: an int id of the state before the policy's turn k, "
                "-1 unknown). Pass environment_factory, or use a turn method without states (turn-grpo, "
                "turn-index, prefix-turn)")
        self._creditlib_state: Optional[_TraceState] = None
        self._creditlib_rewards: Optional[torch.Tensor] = None
        self._creditlib_envs: Optional[list] = None
        self._creditlib_warned_turn_rewards = False
        super().__init__(*args, **kwargs)
        if self.accelerator.is_main_process:  # once per run: which credit method this trainer applies
            print(f"creditlib: {type(self).__name__} trains with credit method {method.summary()}", flush=True)

    # ------------------------------------------------------------------ advantages and clamp
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._creditlib_rewards = rewards_per_func  # [N, n_funcs], gathered over processes
        # the per-rollout environment instances TRL handed its reward functions (this process's rows)
        self._creditlib_envs = getattr(self, "environments", None)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._creditlib_rewards = None
        self._creditlib_envs = None
        with warnings.catch_warnings():
            # TRL 1.16's generation wrapper reads `model.is_gradient_checkpointing` and toggles
            # `gradient_checkpointing_disable/enable` on every rollout: transformers 5 deprecated those
            # names, so each step printed a FutureWarning the user cannot act on. Only those are hidden.
            warnings.filterwarnings("ignore", message=_TRL_CHECKPOINTING_NAMES, category=FutureWarning)
            output = super()._generate_and_score_completions(inputs)
        method = self.credit_method
        mode = "train" if self.model.training else "eval"
        if _is_turn_method(method):
            adv, valid = self._creditlib_turn_advantages(output, mode)  # [B, T]; bool [B, T]
        elif _computes_own_advantages(method):
            adv, valid = self._creditlib_advantages(output, mode)  # [B] or [B, T]; bool like adv
        else:
            adv = output["advantages"]  # [B]: TRL's group-relative advantage
            valid = torch.ones_like(adv, dtype=torch.bool)  # [B]
        if not _is_turn_method(method):
            self._warn_unread_turn_rewards()
        self._creditlib_rewards = None
        self._creditlib_envs = None
        if self.clamp_min is not None:
            below = ((adv < self.clamp_min) & valid).float().sum()
            frac = (below / valid.sum().clamp(min=1)).reshape(1)
            self._metrics[mode]["creditlib/clamped_frac"].append(self.accelerator.gather(frac).mean().item())
            adv = clamp_advantages(adv, self.clamp_min)
        output["advantages"] = adv
        return output

    def _creditlib_outcome(self, mode: str):
        """``(rewards [N], group_ids [N])`` over all processes: TRL's weighted reward sum (0 for the
        unscorable rows, which become groups of one, outside every other baseline, as in TRL)."""
        rewards_per_func = self._creditlib_rewards  # [N, n_funcs], N = rows over all processes
        if rewards_per_func is None:
            raise RuntimeError(
                "creditlib: TRL's _generate_and_score_completions did not call _calculate_rewards, so the rewards "
                f"for credit method {self.credit_method.name!r} are unknown. This TRL version is not supported "
                "(tested with trl 1.16).")
        device = rewards_per_func.device
        unscorable = torch.isnan(rewards_per_func).all(dim=1)  # [N]: every reward function declined
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)  # [N]
        rewards = torch.where(unscorable, torch.zeros_like(rewards), rewards)  # [N]
        n = rewards.shape[0]
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if n % group_size:
            raise RuntimeError(f"creditlib: {n} completions are not whole groups of {group_size}")
        group_ids = torch.arange(n, device=device) // group_size  # [N]
        # Unscorable rows become groups of one (advantage 0, outside every other baseline), as in TRL.
        group_ids = torch.where(unscorable, n + torch.arange(n, device=device), group_ids)  # [N]
        return rewards, group_ids

    def _creditlib_advantages(self, output: dict, mode: str):
        """RLOO ``[B]`` or prefix-tree GAE ``[B, T]`` advantages (before the clamp) of this process's rows."""
        rewards, group_ids = self._creditlib_outcome(mode)  # [N], [N]
        n = rewards.shape[0]
        ids = output["completion_ids"]  # [B, T] local rows, right-padded
        cmask = output["completion_mask"].bool()  # [B, T]
        b, t = ids.shape
        rows = slice(self.accelerator.process_index * b, (self.accelerator.process_index + 1) * b)
        method = self.credit_method.replace(clamp_min=None)  # the clamp is applied (and logged) by the caller
        kind = method.advantage_kind
        if not (kind.needs_tokens or kind.needs_mask):
            adv = method.advantages(rewards, group_ids=group_ids)[rows]  # [B]
            return adv, torch.ones_like(adv, dtype=torch.bool)
        all_ids = self.accelerator.gather(self.accelerator.pad_across_processes(ids, dim=1))  # [N, T']
        all_mask = self.accelerator.gather(
            self.accelerator.pad_across_processes(cmask.to(torch.uint8), dim=1)).bool()  # [N, T']
        if all_ids.shape[0] != n:
            raise RuntimeError(f"creditlib: {all_ids.shape[0]} completions but {n} rewards")
        # Prefixes are compared over every completion token (tool results included: they are part
        # of the state); TRL's loss mask keeps tool tokens out of the loss.
        adv = method.advantages(rewards, all_mask, tokens=all_ids if kind.needs_tokens else None,
                                group_ids=group_ids)  # [N, T'] (per-token kinds) or [N]
        if not kind.per_token:
            adv = adv[rows]  # [B]
            return adv, torch.ones_like(adv, dtype=torch.bool)
        return adv[rows, :t].to(torch.float32), cmask

    # ------------------------------------------------------------------ turns (multi-turn environments)
    def _creditlib_turn_advantages(self, output: dict, mode: str):
        """Per-token ``[B, T]`` advantages of a turn method (before the clamp) for this process's rows.

        What each input is, on TRL 1.16's environment / tool path:

        * **turns**: ``turn_ids = F.turn_ids_from_mask(completion_mask * tool_mask)`` ``[B, T]``:
          each maximal run of policy tokens (outside TRL's tool mask) is one turn, ``k = 0`` the
          first generation; tool results and padding get ``-1`` (and advantage 0). Without tools
          (no ``tool_mask``) every completion is one turn.
        * **outcome reward** ``R_i``: TRL's weighted sum of its reward functions (an environment's
          ``get_reward`` included), added to the last turn. Unscorable rows (every reward function
          returned None) get 0 and a group of their own, as in the other methods.
        * **per-turn rewards** ``turn_rewards [B, K]``: ``env.turn_rewards`` of each row's
          environment (``k``: the reward of the policy's turn ``k``; shorter lists are padded with
          0, a missing attribute is all zeros). Nonzero entries past the row's ``K_i`` turns raise
          ``ValueError`` (one entry per turn), except on a row with no policy token left
          (TRL's ``mask_truncated_completions``): its per-turn rewards are added to its outcome
          reward, so its return still enters its group's baselines as in TRL.
        * **state ids** ``state_ids [B, K]`` (``anchor-state``): ``env.state_ids`` (``k``: an int
          id of the state before turn ``k``, ``-1`` unknown; entries past ``K_i`` are ignored). An
          environment without the attribute raises ``ValueError``.

        Groups are TRL's (``num_generations`` consecutive rows) over all processes: the rows and
        the environment lists are gathered, so a group may span processes (state ids must then
        mean the same state in every process).
        """
        method = self.credit_method.replace(clamp_min=None)  # the clamp is applied (and logged) by the caller
        kind = method.advantage_kind
        rewards, group_ids = self._creditlib_outcome(mode)  # [N], [N]
        n = rewards.shape[0]
        ids = output["completion_ids"]  # [B, T] local rows, right-padded
        cmask = output["completion_mask"].bool()  # [B, T]
        tool = output.get("tool_mask")  # [B, T] int (1: model token) or None
        pmask = cmask if tool is None else cmask & tool.bool()  # [B, T] policy tokens (TRL's loss mask)
        b, t = ids.shape
        acc = self.accelerator
        rows = slice(acc.process_index * b, (acc.process_index + 1) * b)
        turns = _n_turns(F.turn_ids_from_mask(pmask)).tolist()  # [B] K_i
        envs = self._creditlib_envs
        if envs is not None and len(envs) != b:
            raise RuntimeError(f"creditlib: {len(envs)} environments for {b} completions (tested with trl 1.16)")
        k_local = max([1] + turns)
        tr = torch.zeros(b, k_local, dtype=torch.float64, device=ids.device)  # [B, K] per-turn rewards
        st = torch.full((b, k_local), -1, dtype=torch.int64, device=ids.device)  # [B, K] state ids
        fold = torch.zeros(b, dtype=torch.float64, device=ids.device)  # [B] folded into R_i (rows with K_i = 0)
        needs_states = _needs_states(method)
        for i in range(b):
            env = envs[i] if envs is not None else None
            k_i = turns[i]
            values = _env_sequence(env, ENV_TURN_REWARDS, i) if env is not None else None
            if values is not None:
                values = _check_turn_rewards(values, env, i, k_i)
                if k_i == 0:
                    fold[i] = math.fsum(values)
                elif values[:k_i]:
                    tr[i, :min(k_i, len(values))] = torch.tensor(values[:k_i], dtype=torch.float64)
            if needs_states:
                states = _env_sequence(env, ENV_STATE_IDS, i) if env is not None else None
                if states is None:
                    what = ("no environment (environment_factory)" if env is None else
                            f"environment {type(env).__name__} of row {i} has no `{ENV_STATE_IDS}` attribute")
                    raise ValueError(
                        f"credit method {method.name!r} needs state_ids: {what}. TRL 1.16 carries only one "
                        "scalar reward per completion to the advantage step; creditlib reads the states from "
                        f"each rollout's environment: give it a `{ENV_STATE_IDS}` list (a plain attribute, "
                        "refilled by reset(); entry k: an int id of the state before the policy's turn k, -1 "
                        "unknown)")
                states = _check_state_ids(states, env, i)[:k_i]
                if states:
                    st[i, :len(states)] = torch.tensor(states, dtype=torch.int64)
        # every row of the group, over all processes
        all_mask = acc.gather(acc.pad_across_processes(pmask.to(torch.uint8), dim=1)).bool()  # [N, T']
        all_ids = acc.gather(acc.pad_across_processes(ids, dim=1)) if kind.needs_tokens else None  # [N, T']
        all_tr = acc.gather(acc.pad_across_processes(tr, dim=1, pad_index=0))  # [N, K']
        all_fold = acc.gather(fold)  # [N]
        if all_mask.shape[0] != n:
            raise RuntimeError(f"creditlib: {all_mask.shape[0]} completions but {n} rewards")
        turn_ids = F.turn_ids_from_mask(all_mask)  # [N, T'] int64, -1 outside the policy's turns
        extra = {}
        if needs_states:
            extra["state_ids"] = acc.gather(acc.pad_across_processes(st, dim=1, pad_index=-1))  # [N, K']
        total = rewards.to(torch.float64) + all_fold.to(rewards.device)  # [N]
        adv = method.advantages(total, all_mask, tokens=all_ids, group_ids=group_ids, turn_ids=turn_ids,
                                turn_rewards=all_tr.to(rewards.device), **extra)  # [N, T'], 0 off the turns
        k_all = _n_turns(turn_ids).to(torch.float32)  # [N] K_i
        self._metrics[mode]["creditlib/turns_mean"].append(k_all.mean().item())
        return adv[rows, :t].to(torch.float32), pmask

    def _warn_unread_turn_rewards(self) -> None:
        """Once per run: a non-turn method does not read the environments' per-turn rewards."""
        envs = self._creditlib_envs
        if self._creditlib_warned_turn_rewards or not envs:
            return
        for i, env in enumerate(envs):
            values = getattr(env, ENV_TURN_REWARDS, None)
            if values is None or callable(values):
                continue
            try:
                nonzero = any(float(v) != 0.0 for v in values)
            except (TypeError, ValueError):
                nonzero = True
            if nonzero:
                self._creditlib_warned_turn_rewards = True
                warnings.warn(
                    f"creditlib: the environments hold per-turn rewards ({type(env).__name__}.{ENV_TURN_REWARDS}), "
                    f"which credit method {self.credit_method.name!r} does not read: it trains on TRL's outcome "
                    "reward only (reward_funcs / get_reward). Use a turn method (turn-grpo, turn-index, "
                    "anchor-state, prefix-turn) or add the per-turn rewards into get_reward.", UserWarning,
                    stacklevel=3)
                return

    # ------------------------------------------------------------------ the log-ratio style
    def _trace_active(self) -> bool:
        return self.trace_style is not None and not self.trace_style.is_identity()

    def _compute_loss(self, model, inputs):
        if getattr(self, "use_liger_loss", False):
            raise ValueError("creditlib cannot run on TRL's Liger GRPO loss: set use_liger_loss=False.")
        if not self._trace_active():
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]  # [B, T] int, right-padded
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        state = _TraceState(dict(inputs), mask.bool())  # mask: [B, T] bool
        self._creditlib_state = state
        try:
            loss = super()._compute_loss(model, state.inputs)
        finally:
            self._creditlib_state = None
        if not state.applied:
            raise RuntimeError(
                "creditlib: TRL's GRPOTrainer._compute_loss did not call _get_per_token_logps_and_entropies, "
                "so the log-ratio style (trace) was not applied. This TRL version is not supported "
                "(tested with trl 1.16).")
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, *rest = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        state = self._creditlib_state
        if state is None or state.applied:  # generation-time (old / reference) log-probs: untouched
            return (logps, entropies, *rest)
        state.applied = True
        return (self._traced_logps(logps, state), entropies, *rest)

    def _traced_logps(self, logps: torch.Tensor, state: _TraceState) -> torch.Tensor:
        """``log pi_old + z``: TRL's ``log_ratio = per_token_logps - old_per_token_logps`` becomes ``z``."""
        inputs, mask = state.inputs, state.mask
        if mask.shape != logps.shape:
            raise RuntimeError(f"creditlib: completion mask {tuple(mask.shape)} does not match TRL's "
                               f"per-token log-probs {tuple(logps.shape)}")
        old = inputs.get("old_per_token_logps")  # [B, T] or None (on-policy: TRL uses logps.detach())
        old = logps.detach() if old is None else old
        x = logps - old  # [B, T] per-token log importance weight
        z = F.eligibility_trace(x, mask, self.trace_style)  # [B, T], 0 where masked
        traced = old + z  # [B, T]
        # Terms that must keep seeing the true log pi_theta: shift their other operand by the same
        # amount (with the gradient of log pi_theta - traced), so `their_input - traced` = `... - logps`.
        shift = traced - logps  # [B, T]
        if self.beta != 0.0 and "ref_per_token_logps" in inputs:
            inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + shift
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            inputs["sampling_per_token_logps"] = sampling + shift.detach()
        return traced


class CreditTrainer(CreditMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` trained with a creditlib credit method (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a :class:`CreditConfig` (or a
    :class:`GRPOLambdaConfig`; ``None`` for ``CreditConfig``'s defaults: ``credit="grpo-lambda"``).
    """


class GRPOLambdaMixin(CreditMixin):
    """GRPO-lambda on top of any ``trl.GRPOTrainer`` (sub)class: put it first in the bases.

    Reads ``trace_style``, ``trace_gamma``, ``trace_lam``, ``trace_eps``, ``trace_normalize`` and
    ``clamp_min`` from the trainer's ``args`` (a :class:`GRPOLambdaConfig`; a :class:`CreditConfig`
    also works). Same overrides as :class:`CreditMixin`.
    """

    _default_config = GRPOLambdaConfig


class GRPOLambdaTrainer(GRPOLambdaMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` trained with GRPO-lambda (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a :class:`GRPOLambdaConfig`
    (or ``None`` for its defaults).
    """


# ----------------------------------------------------------------------------- tree rollouts
_TOOLS_REFUSAL = ("TRL appends tool results to each completion after rollout_func returns, which would break "
                  "the shared prefixes of the tree and the copied old log-probs")


class TreeRolloutFunc:
    """Tree rollouts (:mod:`creditlib.rl.tree`) as TRL 1.16's ``rollout_func``: pass it to
    ``GRPOTrainer``/:class:`CreditTrainer` as ``rollout_func=tree_rollout_func(TreeSpec(...))``.

    What TRL's ``rollout_func`` is (trl 1.16, experimental): ``rollout_func(prompts, trainer) -> dict``,
    called in ``GRPOTrainer._generate`` with this process's slice of the generation batch. That slice
    comes from TRL's ``RepeatSampler``: each prompt repeated ``num_generations`` times, consecutively
    (TRL's docstring says "no duplication"; the sampler does duplicate). The dict must hold
    ``prompt_ids``, ``completion_ids`` and ``logprobs``: one list per row, ``len(prompts)`` rows in the
    order of ``prompts``, and TRL groups rows ``[k G, (k + 1) G)`` (``G = num_generations``) for its
    advantages and creditlib's. Every other key is handed to the reward functions.

    So each group of ``G`` identical prompts becomes one tree with ``spec.leaves == G`` leaves (else a
    ``ValueError`` naming both), rows in the tree's slot order (roots, then children); a child's shared
    prefix tokens and their sampling log-probs are copied from its parent. The log-probs are those of
    ``softmax(logits / trainer.temperature)``, the distribution TRL's loss recomputes; TRL keeps them
    as ``sampling_per_token_logps`` (its off-policy mask ``off_policy_mask_threshold`` reads them).

    What ``rollout_func`` cannot carry (TRL 1.16), and what this does about it:

    * **old log-probs.** TRL never takes ``old_per_token_logps`` from ``rollout_func``: it uses the
      current policy's detached log-probs on-policy, or recomputes them with a forward pass when
      generation and optimisation steps are misaligned. On-policy, both equal the tree's copied
      log-probs up to float rounding (tested), so nothing is lost.
    * **the tree's structure** (parent, fork position, entropies). No field of TRL's batch holds it;
      creditlib's tree credit (``prefix-gae``, ``treerl``) recovers the tree from the completion
      tokens, so it is not needed. It is kept in :attr:`last_rollout` (this process's last
      :class:`~creditlib.rl.tree.TreeRollout`) and summarised in TRL's metrics (``tree/...``).
    * **groups split across processes.** A tree is sampled in one process, so each process's slice
      must hold whole groups: ``per_device_train_batch_size * steps_per_generation`` must be a
      multiple of ``num_generations`` (else a ``ValueError``).
    * **eval.** With ``num_generations_eval != spec.leaves``, evaluation samples a flat group of
      ``num_generations_eval`` independent completions (``TreeSpec(roots=G_eval, depth=0)``) through
      the same backend; training never changes the group size.

    Refused with a ``ValueError``: TRL's ``top_p < 1``, ``top_k > 0``, ``min_p``,
    ``repetition_penalty != 1``, ``generation_kwargs`` (the tree samples the full tempered
    distribution, the one TRL's loss recomputes), ``use_vllm=True`` (TRL's vLLM engine is not a
    tree backend here), ``tools``/``environment_factory`` and image prompts.

    Args:
        spec: the :class:`~creditlib.rl.tree.TreeSpec`.
        seed: base seed of the trees; each call (and each process) gets its own tree seed from it.
            None: drawn from torch's global generator (seeded by TRL's ``args.seed``).
        decode: :class:`~creditlib.rl.tree.TransformersBackend`'s decoder (default ``"loop"``;
            ``"generate"`` with ``synced_gpus`` under FSDP).
    """

    def __init__(self, spec, *, seed: Optional[int] = None, decode: Optional[str] = None):
        from ..rl.tree import TransformersBackend, TreeSpec

        if not isinstance(spec, TreeSpec):
            raise ValueError(f"spec must be a creditlib.rl.tree.TreeSpec, got {type(spec).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if decode is not None and decode not in TransformersBackend.DECODERS:
            raise ValueError(f"decode must be one of {TransformersBackend.DECODERS} or None, got {decode!r}")
        self.spec = spec
        self.seed = seed
        self.decode = decode
        self.calls = 0
        self.last_rollout = None  # this process's last TreeRollout

    def __repr__(self) -> str:
        return f"TreeRolloutFunc({self.spec}, seed={self.seed}, decode={self.decode})"

    # ------------------------------------------------------------------ checks
    def check_config(self, args) -> None:
        """``ValueError`` unless TRL's config ``args`` can train on this tree (see the class docstring)."""
        self.spec.check_group_size(args.num_generations, "num_generations")
        self._check_sampling(args.top_p, args.top_k, args.min_p, args.repetition_penalty,
                             getattr(args, "generation_kwargs", None))
        if getattr(args, "use_vllm", False):
            raise ValueError("use_vllm=True cannot be combined with a tree rollout_func: the tree samples with the "
                             "trainer's transformers model (creditlib.rl.tree.VLLMBackend is not wired into TRL); "
                             "set use_vllm=False")
        per_process = args.per_device_train_batch_size * args.steps_per_generation
        if per_process % args.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {per_process} is not a multiple of "
                f"num_generations={args.num_generations}: a tree is sampled in one process, so each process must "
                "hold whole groups")

    @staticmethod
    def _check_sampling(top_p, top_k, min_p, repetition_penalty, generation_kwargs) -> None:
        bad = []
        if top_p is not None and top_p != 1.0:
            bad.append(f"top_p={top_p}")
        if top_k not in (None, 0, -1):
            bad.append(f"top_k={top_k}")
        if min_p not in (None, 0.0):
            bad.append(f"min_p={min_p}")
        if repetition_penalty not in (None, 1.0):
            bad.append(f"repetition_penalty={repetition_penalty}")
        if generation_kwargs:
            bad.append(f"generation_kwargs={generation_kwargs!r}")
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be combined with a tree rollout_func: the tree samples the "
                             "full distribution softmax(logits / temperature), the one TRL's loss recomputes "
                             "(leave top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, generation_kwargs=None)")

    def _group_size(self, trainer, mode: str):
        """``(G, spec)`` of this call: the trainer's group size and the tree that fills it."""
        from ..rl.tree import TreeSpec

        if mode == "train":
            G = trainer.num_generations
            self.spec.check_group_size(G, "num_generations")
            return G, self.spec
        G = trainer.num_generations_eval
        return G, (self.spec if G == self.spec.leaves else TreeSpec(roots=G, depth=0))

    # ------------------------------------------------------------------ the rollout
    def __call__(self, prompts: list, trainer) -> dict:
        from ..rl.tree import TransformersBackend, node_seed, sample_tree
        from ..generation import left_pad

        if not isinstance(trainer, GRPOTrainer):
            raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
        mode = "train" if trainer.model.training else "eval"
        G, spec = self._group_size(trainer, mode)
        args = trainer.args
        self._check_sampling(trainer.top_p, trainer.top_k, trainer.min_p, trainer.repetition_penalty,
                             getattr(args, "generation_kwargs", None))
        if trainer.tools or getattr(trainer, "environment_factories", None) is not None:
            raise ValueError(f"tools / environment_factory cannot be combined with a tree rollout_func: {_TOOLS_REFUSAL}")
        if getattr(trainer, "use_vllm", False):
            raise ValueError("use_vllm=True cannot be combined with a tree rollout_func (see TreeRolloutFunc)")
        n = len(prompts)
        if n == 0 or n % G:
            raise ValueError(f"rollout_func got {n} prompts, not whole groups of num_generations={G}: a tree is "
                             "sampled in one process, so per_device_train_batch_size * steps_per_generation must be "
                             "a multiple of num_generations")
        uniq = [prompts[k * G] for k in range(n // G)]
        for k, p in enumerate(uniq):
            if any(prompts[k * G + j] != p for j in range(G)):
                raise ValueError(f"rows {k * G}..{(k + 1) * G - 1} of the rollout_func's prompts are not one prompt "
                                 f"repeated num_generations={G} times (TRL's RepeatSampler order): cannot grow one "
                                 "tree per group")
        prompt_ids, images, mm_fields = trainer._tokenize_prompts(uniq)
        if images is not None or mm_fields:
            raise ValueError("image prompts cannot be combined with a tree rollout_func (text prompts only)")
        prompt_ids = [list(map(int, p)) for p in prompt_ids]
        pad = trainer._tokenizer.pad_token_id
        pad = int(trainer.eos_token_ids[0]) if pad is None else int(pad)
        ids, mask = left_pad(prompt_ids, pad)  # [K, P]
        base = self.seed if self.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        seed = node_seed(base, trainer.accelerator.process_index, self.calls, salt=3)
        self.calls += 1
        fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
        decode = self.decode or ("generate" if fsdp else "loop")
        from trl.models import unwrap_model_for_generation

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TRL_CHECKPOINTING_NAMES, category=FutureWarning)
            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                             gather_deepspeed3_params=args.ds3_gather_for_generation,
                                             gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs) as model, \
                    torch.no_grad(), trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False), \
                    trainer.accelerator.autocast():  # TRL's loss scores tokens under this autocast: sample the same
                backend = TransformersBackend(model, eos_ids=trainer.eos_token_ids, pad_id=pad,
                                              temperature=trainer.temperature, decode=decode,
                                              synced=fsdp and decode == "generate")
                rollout = sample_tree(backend, ids, mask, spec,
                                      max_new_tokens=trainer.max_completion_length, seed=seed, group_size=G,
                                      pad_id=pad)
        self.last_rollout = rollout
        self._log(trainer, mode, rollout)
        cm = rollout.completion_mask  # [B, T]
        lens = cm.sum(1).tolist()
        return {"prompt_ids": [prompt_ids[int(k)] for k in rollout.group_ids.tolist()],
                "completion_ids": [row[:m].tolist() for row, m in zip(rollout.completion_ids, lens)],
                "logprobs": [row[:m].tolist() for row, m in zip(rollout.old_logprobs, lens)]}

    @staticmethod
    def _log(trainer, mode: str, rollout) -> None:
        """The tree's numbers in TRL's metrics (summed over processes)."""
        s = rollout.summary()
        acc = trainer.accelerator
        v = torch.tensor([s["generated_tokens"], s["row_tokens"], s["fallback_relaxed_gap"],
                          s["fallback_at_own_fork"]], dtype=torch.float64, device=acc.device)  # [4]
        tot = acc.gather(v[None]).sum(0).tolist()  # [4]
        m = trainer._metrics[mode]
        m["tree/generated_tokens"].append(tot[0])
        m["tree/token_ratio"].append(tot[0] / max(1.0, tot[1]))
        m["tree/fallback_forks"].append(tot[2] + tot[3])


def tree_rollout_func(spec, *, seed: Optional[int] = None, decode: Optional[str] = None) -> TreeRolloutFunc:
    """Tree rollouts for TRL's ``GRPOTrainer(rollout_func=...)``: see :class:`TreeRolloutFunc`.

    Example (``num_generations`` must equal ``spec.leaves``)::

        args = CreditConfig(output_dir="out", credit="prefix-gae", num_generations=8, ...)
        trainer = CreditTrainer(model=..., reward_funcs=..., args=args, train_dataset=...,
                                rollout_func=tree_rollout_func(TreeSpec(roots=2, forks=1, branches=3, depth=1)))
    """
    return TreeRolloutFunc(spec, seed=seed, decode=decode)
