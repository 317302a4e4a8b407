"""`GRPOLambdaLoss`: GRPO-lambda as a drop-in subclass of TorchRL's ``GRPOLoss``.

Switching a TorchRL GRPO recipe to GRPO-lambda changes one class::

    from creditlib import DecayStyle
    from creditlib.losses import GRPOLambdaLoss

    loss_fn = GRPOLambdaLoss(actor, style=DecayStyle("recent", lam=0.99), clamp_min=-0.1)
    out = loss_fn(batch)                       # same input tensordict as GRPOLoss
    (out.loss_objective + out.loss_entropy).backward()

What changes with respect to ``GRPOLoss`` (TorchRL 0.14):

1. the per-token log-weight ``x_t = log pi(o_t) - log pi_old(o_t)`` is replaced by its
   eligibility trace ``z = W x`` (:func:`creditlib.functional.eligibility_trace`), computed over
   the tokens of the loss mask (``masking_strategy="sft"``: the response tokens; ``"rlhf"``: the
   assistant tokens, several runs per row allowed; ``"generic"``: all attended tokens). TorchRL's
   sequences are prompt + response, left-padded: trace positions count the masked-in tokens only,
   so position 0 is the first response token whatever the padding or prompt length;
2. the advantage passes through the negative clamp ``max(A, clamp_min)`` first;
3. extra metrics: ``trace_abs_mean`` (mean ``|z|``), ``adv_clamped_fraction``,
   ``traced_clip_fraction`` (over the tokens of the loss mask);
4. extra aggregations: verl's ``"seq-mean-token-sum"`` and ``"seq-mean-token-sum-norm"`` (Dr.
   GRPO, with an explicit ``loss_scale_factor``) and ``"token-mean"`` / ``"seq-mean-token-mean"``,
   beside the parent's ``"token_mean"``, ``"prompt_mean"`` and ``"none"``;
5. optional token selection (``select_key``: e.g. the top-entropy tokens of
   :class:`creditlib.modules.EntropySelect`): the policy term of unselected tokens is 0, with the
   aggregation weights of the loss mask (TRL's ``top_entropy_quantile`` convention);
6. the PPO-clip objective is computed with one clamp instead of the parent's stacked ``[B, T, 2]``
   min (for ``A >= 0`` the min is ``A exp(min(z, log(1 + eps_high)))``, for ``A < 0`` it is
   ``A exp(max(z, log(1 - eps_low)))``), which pays for the trace. Values and clip fraction are
   bit-identical; so are the gradients, except for a ``z`` outside a bound by less than the rounding
   of ``exp``, where the parent's tie picks the unclipped branch and this form the exact min.

Every :class:`~creditlib.DecayStyle` works (``recent``/``both`` with floors, ``normalize=True``,
and ``"sequence"``: GSPO's sequence-level ratio ``exp(mean_j x_j)`` on every token). Per-token
advantages ``[B, T, 1]`` (e.g. from :class:`creditlib.modules.PrefixGAE` with ``keepdim=True``)
work as in the parent. :meth:`GRPOLambdaLoss.from_credit` builds the loss of a registered credit
method (``creditlib.credit``).

Everything else is the parent's code path: clip (symmetric or DAPO's asymmetric pair), KL to the
reference and to the inference policy, entropy bonus, ESS (on the traced weights), and KL-Mask. With
``kl_mask_threshold`` set, tokens the parent drops from the loss also contribute 0 to the trace (their
positions still count), so a filtered token gets no gradient through later tokens either.

With ``style=None`` (or ``lam = 0`` in the ``recent`` style) and ``clamp_min=None`` the loss and its
gradients equal ``GRPOLoss`` exactly (tested for every parent aggregation).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._extras import require

require("torchrl", "creditlib.losses.grpo_lambda")
from tensordict import TensorDictBase  # noqa: E402
from torchrl.objectives.llm.grpo import GRPOLoss, GRPOLossOutput

from .. import functional as _F
from ..ops.trace import check_backend
from .._validation import as_bool_mask, check_clamp_min, check_style, deprecated_alias
from ..style import DecayStyle
from . import functional as LF

_UNSET = object()

__all__ = ["GRPOLambdaLoss", "GRPOLambdaLossOutput"]

_PARENT_AGGREGATIONS = ("token_mean", "prompt_mean", "none")
_DEFAULT_STYLE = DecayStyle("recent", gamma=1.0, lam=0.99)


class GRPOLambdaLossOutput(GRPOLossOutput):
    """``GRPOLossOutput`` plus the GRPO-lambda diagnostics (all detached scalars).

    * ``trace_abs_mean``: mean ``|z|`` of the traced log-ratio over the loss-mask tokens;
    * ``adv_clamped_fraction``: fraction of advantages raised by the clamp (per sequence for
      ``[B, 1, 1]`` advantages, per loss-mask token for ``[B, T, 1]``);
    * ``traced_clip_fraction``: fraction of loss-mask tokens whose traced ratio ``exp(z)`` lies
      outside ``[1 - eps_low, 1 + eps_high]`` (the parent's ``clip_fraction`` divides by all
      positions, padding and prompt included).
    """

    trace_abs_mean: Optional[torch.Tensor] = None
    adv_clamped_fraction: Optional[torch.Tensor] = None
    traced_clip_fraction: Optional[torch.Tensor] = None


class GRPOLambdaLoss(GRPOLoss):
    """GRPO-lambda loss (arXiv 2510.00194) for TorchRL LLM pipelines.

    A subclass of :class:`torchrl.objectives.llm.GRPOLoss` that takes the same input tensordict
    and every parent option; see the module docstring for what changes.

    Args:
        actor_network: the policy (e.g. a ``TransformersWrapper`` with ``generate=False``).

    Keyword Args:
        style (DecayStyle | None): trace weights; ``None`` = plain GRPO (no trace). Default
            ``DecayStyle("recent", gamma=1.0, lam=0.99)``.
        clamp_min (float | None): negative-advantage clamp ``max(A, clamp_min)``; the paper's
            ``-0.1`` by default; ``None`` disables it.
        aggregation (str): the parent's ``"token_mean"`` (default), ``"prompt_mean"``, ``"none"``,
            or one of verl's :data:`creditlib.losses.AGGREGATIONS`.
        loss_scale_factor (float | None): the constant ``S`` of ``"seq-mean-token-sum-norm"``
            (required with it: TorchRL sequences hold the prompt too, so the padded length is not
            a meaningful default; pass the generation budget ``max_new_tokens``).
        backend (str): backend of the trace (``"auto"``, ``"cpp"``, ``"triton"``, ``"torch"``,
            ``"reference"``), the name every creditlib function uses. ``trace_backend=`` is its
            deprecated name (one release, with a ``DeprecationWarning``).
        select_key (NestedKey | None): key of a bool ``[B, T]`` (or ``[B, T, 1]``) token selection,
            e.g. :class:`~creditlib.modules.EntropySelect`'s output: unselected tokens get a policy
            term of 0, the aggregation weights stay those of the loss mask (TRL's
            ``top_entropy_quantile``). Not TorchRL's ``loss_mask_key``, which renormalises the
            ``token_mean`` reduction over the masked tokens and applies to every term.
        **kwargs: every ``GRPOLoss`` keyword (``clip_epsilon``, ``kl_mask_threshold``,
            ``entropy_bonus``, ``entropy_coeff``, ``kl_to_ref_coeff``, ``kl_to_inference_coeff``,
            ``masking_strategy``, ``reduction``, ``device``, ...).
    """

    output_type = GRPOLambdaLossOutput

    def __init__(self, actor_network=None, *, style: Optional[DecayStyle] = _DEFAULT_STYLE,
                 clamp_min: Optional[float] = -0.1, aggregation: Optional[str] = "token_mean",
                 loss_scale_factor: Optional[float] = None, backend: str = "auto",
                 select_key=None, trace_backend=_UNSET, **kwargs):
        if trace_backend is not _UNSET:
            deprecated_alias("GRPOLambdaLoss(trace_backend=...)", "GRPOLambdaLoss(backend=...)")
            backend = trace_backend
        style = check_style(style, allow_none=True)
        clamp_min = check_clamp_min(clamp_min)
        agg = aggregation or "token_mean"
        if agg in _PARENT_AGGREGATIONS:
            verl_agg = None
            if loss_scale_factor is not None:
                raise ValueError("loss_scale_factor is only used by aggregation='seq-mean-token-sum-norm'")
        else:
            try:
                verl_agg = LF.normalize_aggregation(agg)
            except ValueError:
                raise ValueError(f"aggregation must be one of {_PARENT_AGGREGATIONS + LF.AGGREGATIONS}, "
                                 f"got {aggregation!r}") from None
            LF._check_scale_factor(loss_scale_factor, verl_agg)
            if verl_agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
                raise ValueError("aggregation='seq-mean-token-sum-norm' needs loss_scale_factor (a constant, "
                                 "e.g. the generation budget max_new_tokens)")
        check_backend(backend)
        super().__init__(actor_network, aggregation=agg, **kwargs)
        self.style = style
        self.clamp_min = clamp_min
        self.select_key = select_key
        self.loss_scale_factor = None if loss_scale_factor is None else float(loss_scale_factor)
        self.backend = backend
        self._verl_aggregation = verl_agg
        self._trace_ctx = None

    @classmethod
    def from_credit(cls, method, actor_network=None, *, select_key="entropy_mask", **kwargs) -> "GRPOLambdaLoss":
        """The loss of a credit method (a registered name or a :class:`~creditlib.credit.CreditMethod`).

        ``style = method.trace``, ``clamp_min = method.clamp_min`` and, when the method selects
        tokens by entropy, ``select_key`` (where :func:`creditlib.modules.credit_pipeline` writes
        the selection). The advantages come from the method's pipeline (``credit_pipeline``);
        clamping them again in the loss changes nothing (``max(max(A, c), c) = max(A, c)``)::

            method = get_credit("grpo-lambda")
            pipe = credit_pipeline(method, group_size=8)
            loss_fn = GRPOLambdaLoss.from_credit(method, actor, entropy_bonus=False)

        Args:
            method: credit-method name or object.
            actor_network: the policy.
            select_key: key of the token selection (used only by entropy-selecting methods).
            **kwargs: any other ``GRPOLambdaLoss`` / ``GRPOLoss`` keyword.
        """
        from ..credit import CreditMethod, get_credit

        m = method if isinstance(method, CreditMethod) else get_credit(method)
        for k in ("style", "clamp_min"):
            if k in kwargs:
                raise ValueError(f"{k} comes from the credit method {m.name!r}; use method.replace({k}=...) "
                                 "(or GRPOLambdaLoss directly) to change it")
        return cls(actor_network, style=m.trace, clamp_min=m.clamp_min,
                   select_key=select_key if m.entropy_quantile is not None else None, **kwargs)

    @property
    def trace_backend(self) -> str:
        """Deprecated name of :attr:`backend`."""
        deprecated_alias("GRPOLambdaLoss.trace_backend", "GRPOLambdaLoss.backend")
        return self.backend

    @property
    def out_keys(self):
        if getattr(self, "_out_keys", None) is None:
            keys = list(super().out_keys)
            self._out_keys = keys + ["trace_abs_mean", "adv_clamped_fraction", "traced_clip_fraction"]
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values):
        self._out_keys = values

    # ------------------------------------------------------------------ hooks into GRPOLoss
    def _log_weight(self, tensordict: TensorDictBase, adv_shape: torch.Size):
        """Parent log-weight ``x`` ``[B, T, 1]`` (0 outside the mask), replaced by its trace ``z``."""
        log_weight, dist, kl_approx, mask = super()._log_weight(tensordict, adv_shape)
        x = log_weight.squeeze(-1)  # [B, T]
        keep = None
        if self.kl_mask_threshold is not None and self.kl_mask_threshold > 0:
            # the parent's KL-Mask (same expression on the same values): filtered tokens enter the
            # trace as 0, so they get no gradient through later tokens either
            keep = 0.5 * (x.detach() ** 2) <= self.kl_mask_threshold  # [B, T]
        if self.style is None or self.style.is_identity():
            z = x
        else:
            x_in = x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
            z = _F.eligibility_trace(x_in, mask, self.style, backend=self.backend)  # [B, T]
            if keep is not None:
                # filtered tokens are out of the loss (the parent masks them); they keep their own
                # log-weight so the parent's ESS / clip_fraction see the same values as GRPOLoss
                z = torch.where(keep, z, x)
        select = None
        if self.select_key is not None:
            select = tensordict.get(self.select_key, None, as_padded_tensor=True)
            if select is None:
                raise ValueError(f"select_key {self.select_key!r} is not in the input tensordict")
            select = as_bool_mask(select, f"the selection ({self.select_key!r})")
            if select.dim() == mask.dim() + 1 and select.shape[-1] == 1:
                select = select.squeeze(-1)
            if select.shape != mask.shape:
                raise ValueError(f"the selection ({self.select_key!r}) must have the loss mask's shape "
                                 f"{tuple(mask.shape)}, got {tuple(select.shape)}")
        self._trace_ctx = {"z": z.detach(), "mask": mask if keep is None else mask & keep, "filtered": keep is not None,
                           "select": select}
        return z.unsqueeze(-1), dist, kl_approx, mask

    def _compute_policy_objective(self, log_weight: torch.Tensor, advantage: torch.Tensor):
        """PPO-clip objective ``-min(r A', clip(r) A')`` on the traced weight, ``A' = max(A, clamp_min)``.

        The parent's value and gradient (module docstring, item 6) with one clamp: for ``A' >= 0``
        the min is ``A' exp(min(z, hi))`` and for ``A' < 0`` it is ``A' exp(max(z, lo))`` (``lo, hi``
        the log clip bounds), so no ``[B, T, 2]`` stack and min are needed. Returns ``(-gain, clip_fraction)``
        with the parent's clip fraction (mean over all positions of ``clamp(z, lo, hi) != z``).
        """
        adv = advantage if self.clamp_min is None else advantage.clamp_min(self.clamp_min)
        dt = log_weight.dtype
        lo, hi = (b.to(dt) for b in self._clip_bounds)  # 0-dim, rounded as the parent's clamp rounds them
        # the one PPO clip of creditlib (losses.functional), on the parent's bounds
        loss, clipped = LF.clipped_surrogate_log_bounds(log_weight, adv, lo, hi)  # [B, T, 1] each
        clip_fraction = clipped.to(dt).mean()
        ctx = self._trace_ctx
        if ctx is not None and ctx.get("select") is not None:
            loss = torch.where(ctx["select"].unsqueeze(-1), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
        return loss, clip_fraction

    def _aggregate_loss_value(self, value: torch.Tensor, mask: torch.Tensor,
                              tensordict: Optional[TensorDictBase] = None) -> torch.Tensor:
        if self._verl_aggregation is None or self.reduction == "none":
            return super()._aggregate_loss_value(value, mask, tensordict=tensordict)
        v = value.squeeze(-1) if value.dim() == mask.dim() + 1 else value  # [B, T]
        return LF.aggregate(v, mask, self._verl_aggregation, loss_scale_factor=self.loss_scale_factor)

    def forward(self, tensordict: TensorDictBase) -> GRPOLambdaLossOutput:
        self._trace_ctx = None
        try:
            out = super().forward(tensordict)
            ctx = self._trace_ctx
            if ctx is None:  # pragma: no cover - the parent always calls _log_weight
                raise RuntimeError("GRPOLambdaLoss: _log_weight was not called by GRPOLoss.forward")
            with torch.no_grad():
                out.trace_abs_mean, out.traced_clip_fraction = self._trace_metrics(ctx, out)
                out.adv_clamped_fraction = self._clamped_fraction(tensordict, ctx["mask"],
                                                                  out.trace_abs_mean.dtype)
            return out
        finally:
            self._trace_ctx = None

    def _trace_metrics(self, ctx, out):
        """(mean |z|, fraction of clipped traced ratios) over the tokens of the loss mask."""
        z, mask = ctx["z"], ctx["mask"]  # [B, T], [B, T]
        half = z.dtype in (torch.float16, torch.bfloat16)
        if ctx["filtered"]:  # KL-Mask: filtered tokens hold their raw log-weight, leave them out
            z = torch.where(mask, z, torch.zeros((), dtype=z.dtype, device=z.device))
        if ctx["filtered"] or half:
            lo, hi = self._clip_bounds  # the parent's bounds, as it clamps
            n_clipped = (z.clamp(lo.to(z.dtype), hi.to(z.dtype)) != z).sum()
        else:
            # z is exactly 0 outside the mask, and 0 is inside the clip range: the parent's
            # clip_fraction (a mean over all B * T positions) holds the count, no extra pass needed
            n_clipped = torch.round(out.clip_fraction.to(torch.float64) * z.numel())
        mdt = torch.float32 if half else z.dtype  # sums and counts of half values lose precision
        n = mask.sum().clamp_min(1).to(mdt)
        abs_sum = z.abs().sum(dtype=mdt)  # 0 outside the mask
        return abs_sum / n, n_clipped.to(mdt) / n

    def _clamped_fraction(self, tensordict: TensorDictBase, mask: torch.Tensor, dtype) -> torch.Tensor:
        if self.clamp_min is None:
            return torch.zeros((), dtype=dtype, device=mask.device)
        adv = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        if adv.numel() == 0:  # empty micro-batch
            return torch.zeros((), dtype=dtype, device=mask.device)
        below = (adv < self.clamp_min).reshape(adv.shape[0], -1)  # [B, 1] or [B, T]
        if below.shape[-1] == mask.shape[-1] and below.shape[-1] != 1:
            return LF._masked_mean(below.to(dtype), mask)
        return below.to(dtype).mean()
