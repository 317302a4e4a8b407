"""GRPO-lambda inside Hugging Face TRL's ``GRPOTrainer`` (optional extra: ``pip install 'creditlib[trl]'``).

    from creditlib.integrations.trl import GRPOLambdaConfig, GRPOLambdaTrainer

    args = GRPOLambdaConfig(output_dir="out", trace_style="recent", trace_lam=0.99, clamp_min=-0.1)
    trainer = GRPOLambdaTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward_fn,
                                args=args, train_dataset=dataset)
    trainer.train()

What changes with respect to TRL's ``GRPOTrainer`` (and nothing else does):

1. **Negative-advantage clamp.** After TRL has computed its group-relative advantages
   (``_generate_and_score_completions``), ``A <- max(A, clamp_min)`` (``clamp_min=None`` disables it).
2. **Eligibility trace over the per-token log importance weight.** Inside TRL's ``_compute_loss`` the
   per-token log-ratio ``x_t = log pi_theta(o_t) - log pi_old(o_t)`` (completion tokens, right-padded,
   mask = completion mask x tool mask) becomes ``z_t = sum_{j<=t} w(t, j) x_j``
   (:func:`creditlib.functional.eligibility_trace` with ``DecayStyle(trace_style, trace_gamma,
   trace_lam, trace_eps)``). Every TRL ``loss_type`` then runs unchanged on ``z``: the clipped
   surrogates (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``), ``sapo``, and the
   log-prob-weighted ``cispo`` / ``vespo`` (whose ``log pi`` term becomes ``log pi_old + z``, i.e. the
   trace's forward view ``C_j = sum_{t>=j} w(t, j) a_t``). ``importance_sampling_level="sequence"``
   averages ``z`` instead of ``x``.

How: TRL's ``_compute_loss`` computes ``log_ratio = per_token_logps - old_per_token_logps``. The
trainer overrides two small methods and calls ``super()`` in both: during the loss only,
``_get_per_token_logps_and_entropies`` returns ``old + z`` in place of ``log pi_theta``, so TRL's own
subtraction yields ``z``. The reference KL term and the off-policy sequence mask still see the true
``log pi_theta`` (their inputs are shifted by the same amount, with the gradient of ``log pi_theta``),
so ``beta``, ``use_bias_correction_kl`` and ``off_policy_mask_threshold`` keep their meaning; the
entropies are untouched. If a future TRL stops routing the loss through that method the trainer
raises instead of silently training plain GRPO.

With ``trace_gamma * trace_lam = 0``, ``trace_eps = 0``, ``trace_style="recent"`` and
``clamp_min=None`` this is stock TRL (``z = x``). The old TRL Liger GRPO loss, which bypasses
``_compute_loss``, is refused with a ``ValueError``; TRL 1.x's layer-only Liger kernels are fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "creditlib.integrations.trl needs Hugging Face TRL and accelerate: "
        "pip install 'creditlib[trl]' (trl>=1.0, accelerate>=1.0)") from e

from .. import functional as F
from ..losses.functional import clamp_advantages
from ..style import STYLES, DecayStyle

__all__ = ["GRPOLambdaConfig", "GRPOLambdaMixin", "GRPOLambdaTrainer"]


def _check_clamp_min(clamp_min) -> Optional[float]:
    if clamp_min is None:
        return None
    try:
        c = float(clamp_min)
    except (TypeError, ValueError):
        raise ValueError(f"clamp_min must be None or a float <= 0, got {clamp_min!r}") from None
    if not (c <= 0.0) or math.isinf(c):
        raise ValueError(f"clamp_min must be None or a finite float <= 0 (paper default -0.1), got {clamp_min!r}")
    return c


@dataclass
class GRPOLambdaConfig(GRPOConfig):
    r"""TRL's :class:`~trl.GRPOConfig` plus the GRPO-lambda fields (arXiv 2510.00194).

    Every ``GRPOConfig`` field keeps its meaning (``loss_type``, ``epsilon``, ``beta``,
    ``importance_sampling_level``, ...). The added fields:

    Parameters:
        trace_style (`str`, defaults to `"recent"`):
            Eligibility-trace weights ``w(t, j)`` over the per-token log-ratios: `"recent"`
            (``d^(t-j)``, the accumulating trace) or `"both"` (``max(d^(t-j), d^j)``: credit to the
            latest and to the earliest tokens), with ``d = trace_gamma * trace_lam``.
        trace_gamma (`float`, defaults to `1.0`):
            Discount ``gamma`` in [0, 1].
        trace_lam (`float`, defaults to `0.99`):
            Trace decay ``lambda`` in [0, 1]. ``trace_gamma * trace_lam = 0`` with `"recent"` and no
            floor is plain GRPO.
        trace_eps (`float`, defaults to `0.0`):
            Weight floor in [0, 1]: ``w(t, j) = max(w(t, j), trace_eps)`` for ``j <= t`` (0 = none).
        clamp_min (`float` or `None`, defaults to `-0.1`):
            Negative-advantage clamp ``A <- max(A, clamp_min)``, a float ``<= 0``; `None` disables it.
    """

    trace_style: str = field(
        default="recent",
        metadata={"help": "Eligibility-trace weights: 'recent' (d^(t-j)) or 'both' (max(d^(t-j), d^j)), "
                          "d = trace_gamma * trace_lam.", "choices": list(STYLES)},
    )
    trace_gamma: float = field(default=1.0, metadata={"help": "Discount gamma in [0, 1] of the trace."})
    trace_lam: float = field(
        default=0.99,
        metadata={"help": "Trace decay lambda in [0, 1]; trace_gamma * trace_lam = 0 is plain GRPO."},
    )
    trace_eps: float = field(
        default=0.0, metadata={"help": "Weight floor in [0, 1] of the trace (0 disables it)."})
    clamp_min: Optional[float] = field(
        default=-0.1,
        metadata={"help": "Negative-advantage clamp A <- max(A, clamp_min), a float <= 0; None disables it."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.decay_style()  # validate early, with the config's field names
        self.clamp_min = _check_clamp_min(self.clamp_min)

    def decay_style(self) -> DecayStyle:
        """The :class:`creditlib.DecayStyle` these fields describe."""
        try:
            return DecayStyle(self.trace_style, self.trace_gamma, self.trace_lam, self.trace_eps)
        except ValueError as e:  # name the config fields, not DecayStyle's arguments
            msg = str(e)
            for name in ("style", "gamma", "lam", "eps"):
                if msg.startswith(name + " "):
                    msg = "trace_" + msg
                    break
            raise ValueError(msg) from None


class _TraceState:
    """What the loss override hands to the log-prob override for one ``_compute_loss`` call."""

    __slots__ = ("inputs", "mask", "applied")

    def __init__(self, inputs: dict, mask: torch.Tensor):
        self.inputs = inputs  # a shallow copy of TRL's batch dict
        self.mask = mask  # [B, T] bool: completion mask x tool mask
        self.applied = False


class GRPOLambdaMixin:
    """GRPO-lambda on top of any ``trl.GRPOTrainer`` (sub)class: put it first in the bases.

    Reads ``trace_style``, ``trace_gamma``, ``trace_lam``, ``trace_eps`` and ``clamp_min`` from the
    trainer's ``args`` (a :class:`GRPOLambdaConfig`). Overrides ``_generate_and_score_completions``
    (the clamp), ``_compute_loss`` and ``_get_per_token_logps_and_entropies`` (the trace), each
    calling ``super()``.

    Attributes:
        trace_style: the :class:`creditlib.DecayStyle` in use.
        clamp_min: the advantage floor, or ``None``.
    """

    def __init__(self, *args, **kwargs):
        cfg = kwargs.get("args", args[2] if len(args) > 2 else None)
        if cfg is None:
            model = kwargs.get("model", args[0] if args else None)
            config = getattr(model, "config", None)
            name = model if isinstance(model, str) else getattr(config, "_name_or_path", "model")
            cfg = GRPOLambdaConfig(f"{str(name).split('/')[-1] or 'model'}-GRPO-lambda")
            if "args" in kwargs or len(args) <= 2:
                kwargs["args"] = cfg
            else:
                args = args[:2] + (cfg,) + args[3:]
        if not isinstance(cfg, GRPOLambdaConfig):
            raise ValueError(
                f"args must be a creditlib.integrations.trl.GRPOLambdaConfig (TRL's GRPOConfig plus "
                f"trace_style, trace_gamma, trace_lam, trace_eps, clamp_min), got {type(cfg).__name__}")
        # TRL < 1.0 had a fused Liger GRPO loss that replaces `_compute_loss`: the trace would be skipped.
        if getattr(cfg, "use_liger_loss", False) or (
                getattr(cfg, "use_liger_kernel", False) and hasattr(GRPOTrainer, "compute_liger_loss")):
            raise ValueError(
                "GRPO-lambda cannot run on TRL's Liger GRPO loss (use_liger_loss / use_liger_kernel with a "
                "TRL that has compute_liger_loss): it bypasses GRPOTrainer._compute_loss, where the "
                "eligibility trace is applied. Set use_liger_loss=False / use_liger_kernel=False.")
        self.trace_style: DecayStyle = cfg.decay_style()
        self.clamp_min: Optional[float] = _check_clamp_min(cfg.clamp_min)
        self._creditlib_state: Optional[_TraceState] = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ the clamp
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.clamp_min is not None:
            adv = output["advantages"]  # [B] (or [B, T] from a subclass)
            clamped = clamp_advantages(adv, self.clamp_min)
            mode = "train" if self.model.training else "eval"
            frac = (adv < self.clamp_min).float().mean().reshape(1) if adv.numel() else adv.new_zeros(1)
            self._metrics[mode]["creditlib/clamped_frac"].append(self.accelerator.gather(frac).mean().item())
            output["advantages"] = clamped
        return output

    # ------------------------------------------------------------------ the trace
    def _compute_loss(self, model, inputs):
        if getattr(self, "use_liger_loss", False):
            raise ValueError("GRPO-lambda cannot run on TRL's Liger GRPO loss: set use_liger_loss=False.")
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
                "so the eligibility trace was not applied. This TRL version is not supported by "
                "GRPOLambdaTrainer (tested with trl 1.16).")
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


class GRPOLambdaTrainer(GRPOLambdaMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` trained with GRPO-lambda (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a :class:`GRPOLambdaConfig`
    (or ``None`` for its defaults).
    """
