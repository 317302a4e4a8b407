"""creditlib.losses.functional: the GRPO-lambda objective on plain tensors.

Everything here takes ``[B, T]`` tensors (``B`` sequences, ``T`` token positions, a bool ``mask``
marking the tokens that count) and no framework objects, so any trainer (TRL, verl, a hand-written
loop, :class:`creditlib.losses.GRPOLambdaLoss` for TorchRL) can call it with its own tensors::

    loss, metrics = grpo_lambda_loss(logp, old_logp, advantages, mask, DecayStyle("recent", lam=0.99))

The pieces of the loss are public too, for trainers that assemble their own objective:

* :func:`traced_log_ratio` -- ``z = W (logp - old_logp)``, the eligibility trace of the token
  log-ratios (the importance ratio of GRPO-lambda is ``exp(z)``);
* :func:`clamp_advantages` -- the negative-advantage clamp ``max(A, c)``;
* :func:`clipped_surrogate` -- the per-token PPO-clipped loss of a (traced) log-ratio;
* :func:`aggregate` / :func:`aggregation_weights` -- verl's ``loss_agg_mode`` reductions
  (``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``,
  ``"seq-mean-token-sum-norm"``), and the per-token weight each of them gives.

Masked positions never leak: their inputs may hold NaN or inf (padding, prompt tokens) and are
replaced before any arithmetic, in the forward and the backward pass. Masks are bool or integer
(0/1, nonzero = valid: Hugging Face / TRL's ``int64`` masks); a float mask is refused.

A valid log-ratio of ``-inf`` (``logp = -inf``: the current policy gives a sampled token
probability 0) is defined: the trace carries ``-inf`` to every later token whose weight on it is
``> 0`` (never NaN), the ratio there is ``exp(-inf) = 0``, and the clip bounds the loss: for
``A >= 0`` the token contributes 0, for ``A < 0`` it contributes ``-(1 - eps_low) A``. The loss
and every gradient stay finite, for every style (tested against the ``"torch"`` and
``"reference"`` backends). A ``+inf`` or NaN valid log-ratio is not bounded (PPO's clip does not
bound ``r A`` from above for ``A < 0``): keep ``old_logp`` finite on valid tokens.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .. import functional as _F
from .._validation import as_bool_mask, check_clamp_min, check_float, check_style, is_real
from .._validation import check_mask as _check_mask  # the one mask validator of the library
from ..style import DecayStyle

__all__ = [
    "AGGREGATIONS",
    "grpo_lambda_loss",
    "traced_log_ratio",
    "clamp_advantages",
    "clipped_surrogate",
    "clipped_surrogate_log_bounds",
    "aggregate",
    "aggregation_weights",
    "normalize_aggregation",
    "parse_clip_eps",
]

#: Aggregation names, as verl's ``actor.loss_agg_mode``.
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

_HALF = (torch.float16, torch.bfloat16)

ClipEps = Union[float, Tuple[float, float], Sequence[float]]


# ----------------------------------------------------------------------------- validation
def _check_float(name: str, x, shape: Optional[torch.Size] = None, like: Optional[torch.Tensor] = None):
    check_float(name, x)
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (like logp), got {tuple(x.shape)}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {like.device}")
    return x


def _check_style(style) -> Optional[DecayStyle]:
    return check_style(style, allow_none=True)


_is_real = is_real  # kept for the modules that import it from here


def normalize_aggregation(aggregation: str) -> str:
    """Canonical aggregation name: one of :data:`AGGREGATIONS` (``_`` is accepted for ``-``).

    Raises:
        ValueError: unknown name.
    """
    if not isinstance(aggregation, str):
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    name = aggregation.replace("_", "-")
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return name


def parse_clip_eps(clip_eps: ClipEps) -> Tuple[float, float]:
    """``clip_eps`` as ``(eps_low, eps_high)``: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]``.

    Args:
        clip_eps: a float ``e`` (symmetric, ``(e, e)``) or a pair ``(eps_low, eps_high)``
            (DAPO's clip-higher), with ``0 <= eps_low < 1`` and ``eps_high >= 0``.
    """
    if isinstance(clip_eps, (tuple, list)):
        if len(clip_eps) != 2 or not all(_is_real(e) for e in clip_eps):
            raise ValueError(f"clip_eps must be a float or a pair (eps_low, eps_high) of floats, got {clip_eps!r}")
        low, high = float(clip_eps[0]), float(clip_eps[1])
    elif _is_real(clip_eps):
        low = high = float(clip_eps)
    else:
        raise ValueError(f"clip_eps must be a float or a pair (eps_low, eps_high) of floats, got {clip_eps!r}")
    if not (0.0 <= low < 1.0):
        raise ValueError(f"clip_eps low must be in [0, 1) so that 1 - eps_low > 0, got {low}")
    if not high >= 0.0:
        raise ValueError(f"clip_eps high must be >= 0, got {high}")
    return low, high


def _check_scale_factor(loss_scale_factor, aggregation: str):
    if loss_scale_factor is None:
        return None
    if aggregation != "seq-mean-token-sum-norm":
        raise ValueError(f"loss_scale_factor is only used by aggregation='seq-mean-token-sum-norm', "
                         f"got it with aggregation={aggregation!r}")
    if not _is_real(loss_scale_factor) or float(loss_scale_factor) <= 0:
        raise ValueError(f"loss_scale_factor must be a positive number (e.g. the generation budget "
                         f"max_new_tokens), got {loss_scale_factor!r}")
    return float(loss_scale_factor)


# ----------------------------------------------------------------------------- pieces
def traced_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                     style: Optional[DecayStyle], *, backend: str = "auto") -> torch.Tensor:
    """Traced log importance ratio ``z_t = sum_{j<=t} w(t, j) (logp_j - old_logp_j)``.

    Positions ``t, j`` count the valid tokens of each row from 0 (left padding, several valid runs
    per row: all fine). ``exp(z)`` is the importance ratio of GRPO-lambda.

    Args:
        logp: float ``[..., T]``, log-probabilities of the sampled tokens under the current policy.
        old_logp: float ``[..., T]``, the same under the sampling (old) policy.
        mask: bool or integer ``[..., T]``, nonzero where the token counts. Masked inputs are
            ignored even when NaN/inf.
        style: a :class:`~creditlib.DecayStyle`, or ``None`` for plain GRPO (``z = x``).
        backend: trace backend (see :func:`creditlib.functional.eligibility_trace`).
    Returns:
        ``z`` ``[..., T]`` in the dtype of ``logp - old_logp``, 0 at masked positions.
    """
    style = _check_style(style)
    _check_float("logp", logp)
    _check_float("old_logp", old_logp, shape=logp.shape, like=logp)
    mask = _check_mask(mask, logp, "logp")
    zero = torch.zeros((), dtype=torch.promote_types(logp.dtype, old_logp.dtype), device=logp.device)
    x = torch.where(mask, logp - old_logp, zero)  # [..., T], NaN-free (where, not multiply)
    if style is None or style.is_identity() or x.numel() == 0:
        return x  # (empty: x is all there is, and it keeps the autograd graph of logp)
    return _F.eligibility_trace(x, mask, style, backend=backend)


def clamp_advantages(advantages: torch.Tensor, clamp_min: Optional[float]) -> torch.Tensor:
    """The negative-advantage clamp of GRPO-lambda: ``max(A, clamp_min)`` (``None``: no clamp).

    Large negative advantages times accumulated (traced) log-ratios give destructive gradients;
    the paper's default is ``clamp_min = -0.1``. Works on any shape.

    ``clamp_min`` follows the one clamp rule of the library: ``None`` or a finite float ``<= 0``
    (a positive value would raise every advantage and is a ``ValueError``).
    """
    clamp_min = check_clamp_min(clamp_min)
    if clamp_min is None:
        return advantages
    return advantages.clamp_min(clamp_min)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: ClipEps = 0.2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clipped loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r = exp(log_ratio)``.

    The clip is applied to the log-ratio (``clamp(log r, log(1 - eps_low), log(1 + eps_high))``),
    as TorchRL's ``GRPOLoss`` does, and the min is taken in one clamp: for ``A >= 0`` it is
    ``A exp(min(log r, log(1 + eps_high)))``, for ``A < 0`` it is ``A exp(max(log r, log(1 - eps_low)))``.
    Values are bit-identical to the two-branch form and so are the gradients, except within a
    rounding of ``exp`` outside a bound, where the two-branch form ties and sends the gradient
    through the unclipped branch; this form follows the exact min there. A third of the memory passes.

    Args:
        log_ratio: float ``[..., T]`` (for GRPO-lambda, the traced ``z``).
        advantages: broadcastable to ``log_ratio``.
        clip_eps: float or ``(eps_low, eps_high)``.
    Returns:
        ``(loss, clipped)``: per-token loss ``[..., T]`` and a bool ``[..., T]``, True where the
        ratio lies outside the clip range.
    """
    low, high = parse_clip_eps(clip_eps)
    dt, dev = log_ratio.dtype, log_ratio.device
    lo = torch.tensor(math.log1p(-low), dtype=dt, device=dev)  # rounded as clamp rounds a float bound
    hi = torch.tensor(math.log1p(high), dtype=dt, device=dev)
    return clipped_surrogate_log_bounds(log_ratio, advantages, lo, hi)


def clipped_surrogate_log_bounds(log_ratio: torch.Tensor, advantages: torch.Tensor, lo: torch.Tensor,
                                 hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`clipped_surrogate` with the log clip bounds given: the one implementation of the PPO
    clip in creditlib (``GRPOLambdaLoss`` calls it with TorchRL's own bounds).

    Args:
        log_ratio: float ``[..., T]``.
        advantages: broadcastable to ``log_ratio``.
        lo, hi: 0-dim tensors of ``log_ratio``'s dtype, ``log(1 - eps_low)`` and ``log(1 + eps_high)``.
    Returns:
        ``(loss, clipped)`` as :func:`clipped_surrogate`. A ``-inf`` log-ratio gives ratio 0: loss
        0 for ``A >= 0``, ``-exp(lo) A`` for ``A < 0``, with a zero gradient (never NaN).
    """
    inf = torch.full((), float("inf"), dtype=log_ratio.dtype, device=log_ratio.device)
    pos = advantages >= 0  # broadcastable to log_ratio
    lw = log_ratio.clamp(torch.where(pos, -inf, lo), torch.where(pos, hi, inf))  # [..., T] the binding side only
    loss = -(lw.exp() * advantages)  # [..., T]
    with torch.no_grad():
        clipped = log_ratio.clamp(lo, hi) != log_ratio  # [..., T]
    return loss, clipped


def aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
              *, loss_scale_factor: Optional[float] = None) -> torch.Tensor:
    """Reduce per-token ``values`` ``[..., T]`` to a scalar, as verl's ``agg_loss``.

    With ``n_i`` the valid tokens of sequence ``i``, ``N = sum_i n_i`` and ``B'`` the number of
    sequences with ``n_i > 0``:

    * ``"token-mean"``: ``sum_{i,t} v / N`` (DAPO; every token weighs the same);
    * ``"seq-mean-token-mean"``: ``(1/B') sum_i (1/n_i) sum_t v`` (GRPO paper);
    * ``"seq-mean-token-sum"``: ``(1/B') sum_i sum_t v``;
    * ``"seq-mean-token-sum-norm"``: ``(1/B') sum_{i,t} v / S`` with the constant ``S =
      loss_scale_factor`` (default: ``T``, the padded response length; 1 when ``T = 0``), Dr. GRPO's
      length-unbiased form, as verl 0.9's ``agg_loss`` (the mean over sequences of the token sums, divided by ``S``).

    Masked values are ignored even when NaN. An all-masked input gives 0 (not NaN).

    Args:
        values: float ``[..., T]``.
        mask: bool or integer ``[..., T]`` (nonzero = valid).
        aggregation: one of :data:`AGGREGATIONS`.
        loss_scale_factor: ``S`` for ``"seq-mean-token-sum-norm"`` only.
    """
    aggregation = normalize_aggregation(aggregation)
    scale = _check_scale_factor(loss_scale_factor, aggregation)
    _check_float("values", values)
    mask = _check_mask(mask, values, "values")
    if values.dim() == 0:
        raise ValueError("values must have a token dimension [..., T], got a scalar")
    v = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))  # [..., T]
    if aggregation == "token-mean":
        return v.sum() / mask.sum().clamp_min(1).to(values.dtype)
    n = mask.sum(-1)  # [...] valid tokens per sequence
    n_seq = (n > 0).sum().clamp_min(1).to(values.dtype)  # B'
    if aggregation == "seq-mean-token-sum":
        return v.sum() / n_seq
    if aggregation == "seq-mean-token-sum-norm":
        return v.sum() / n_seq / (scale if scale is not None else float(max(values.shape[-1], 1)))
    seq = v.sum(-1) / n.clamp_min(1).to(values.dtype)  # [...] per-sequence token mean
    return seq.sum() / n_seq


def aggregation_weights(mask: torch.Tensor, aggregation: str = "token-mean", *,
                        loss_scale_factor: Optional[float] = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights ``c_t`` with ``aggregate(v, mask, aggregation) == sum_t c_t v_t``.

    This is the "aggregation weight" of the forward view: at ratio 1 the gradient of the
    GRPO-lambda loss equals the gradient of ``-sum_j C_j logp_j`` with
    ``C = creditlib.functional.traced_credit(A * c, mask, style)``. Trainers that take per-token
    advantages with a plain token-sum loss can use ``traced_credit(A * c, ...)`` directly.

    Args:
        mask: bool or integer ``[..., T]`` (nonzero = valid).
        aggregation, loss_scale_factor: as in :func:`aggregate`.
        dtype: float dtype of the result.
    Returns:
        ``[..., T]`` weights, 0 at masked positions.
    """
    aggregation = normalize_aggregation(aggregation)
    scale = _check_scale_factor(loss_scale_factor, aggregation)
    mask = as_bool_mask(mask)
    if mask.dim() == 0:
        raise ValueError("mask must have a token dimension [..., T], got a scalar")
    m = mask.to(dtype)  # [..., T]
    if aggregation == "token-mean":
        return m / mask.sum().clamp_min(1).to(dtype)
    n = mask.sum(-1, keepdim=True)  # [..., 1]
    n_seq = (n > 0).sum().clamp_min(1).to(dtype)
    if aggregation == "seq-mean-token-sum":
        return m / n_seq
    if aggregation == "seq-mean-token-sum-norm":
        return m / n_seq / (scale if scale is not None else float(max(mask.shape[-1], 1)))
    return m / (n.clamp_min(1).to(dtype) * n_seq)


def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum() / mask.sum().clamp_min(1).to(v.dtype)


# ----------------------------------------------------------------------------- the loss
def grpo_lambda_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    style: Optional[DecayStyle],
    *,
    clip_eps: ClipEps = 0.2,
    clamp_min: Optional[float] = -0.1,
    aggregation: str = "token-mean",
    loss_scale_factor: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    loss_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO-lambda loss (arXiv 2510.00194) from plain tensors.

    ``L = agg_t[ -min(exp(z_t) A'_t, clip(exp(z_t), 1 - eps_low, 1 + eps_high) A'_t) ]
    + kl_coef * agg_t[KL_t] - entropy_coef * agg_t[H_t]``

    with ``z = traced_log_ratio(logp, old_logp, mask, style)``, ``A' = max(A, clamp_min)``,
    ``KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (the k3 estimator, verl's
    ``low_var_kl``) and ``agg`` the chosen aggregation. ``style=None`` (or ``lam = 0`` with the
    ``recent`` style) with ``clamp_min=None`` is plain GRPO / PPO-clip.

    At ratio 1 the loss value is ``-agg(A')``, identical for every ``style``: the trace only shows
    in the gradient (see ``docs/torchrl.md``).

    Args:
        logp: float ``[B, T]``, log-probs of the sampled tokens under the policy being trained
            (carries the gradient).
        old_logp: float ``[B, T]``, log-probs under the sampling policy (must not require grad).
        advantages: float ``[B]`` / ``[B, 1]`` (one per sequence) or ``[B, T]`` (per token).
        mask: bool or integer ``[B, T]`` (nonzero = valid: ``int64`` 0/1 masks of Hugging Face
            and TRL work as they are; a float mask is a ``ValueError`` that says ``.bool()``),
            True on the tokens that count (response tokens). Any pattern: left/right padding,
            several runs per row. Masked entries of every input may be NaN.
        style: :class:`~creditlib.DecayStyle` or ``None``.
        clip_eps: float or ``(eps_low, eps_high)`` pair.
        clamp_min: negative-advantage clamp ``c`` (paper: -0.1), a finite float ``<= 0``; ``None``
            disables it.
        aggregation: one of :data:`AGGREGATIONS` (verl's ``loss_agg_mode`` names).
        loss_scale_factor: the constant of ``"seq-mean-token-sum-norm"`` (default ``T``).
        ref_logp: float ``[B, T]``, reference-policy log-probs (for the KL term/metric).
        kl_coef: weight of the KL-to-reference term (needs ``ref_logp`` when > 0).
        entropy: float ``[B, T]`` per-token entropy of the policy (for the entropy bonus/metric).
        entropy_coef: weight of the entropy bonus (needs ``entropy`` when != 0).
        loss_mask: optional bool or integer ``[B, T]``, the tokens whose policy term enters the loss (e.g.
            the top-entropy tokens of :func:`creditlib.functional.entropy_mask`). TRL's
            ``top_entropy_quantile`` convention: the policy term of the other tokens is 0 and the
            aggregation weights stay those of ``mask`` (so the selected loss is a part of the
            unselected one); the trace, the KL and entropy terms and the metrics use ``mask``.
            For a trace over the selected tokens only, pass the selection as ``mask`` instead.
        backend: trace backend (see :func:`creditlib.functional.eligibility_trace`).

    Returns:
        ``(loss, metrics)``: the scalar loss (float32 for half inputs, else the input dtype) and a
        dict of detached scalar tensors:

        * ``loss_policy``, and ``loss_kl`` / ``loss_entropy`` when those terms are on;
        * ``trace_abs_mean``: mean ``|z|`` over valid tokens; ``log_ratio_abs_mean``: mean
          ``|logp - old_logp|`` (the untraced ratio);
        * ``adv_clamped_fraction``: fraction of advantages raised by the clamp (per sequence for
          ``[B]`` advantages, per valid token for ``[B, T]``);
        * ``traced_clip_fraction``: fraction of valid tokens whose traced ratio is outside the
          clip range;
        * ``ratio_mean``: mean ``exp(z)``; ``approx_kl``: mean ``old_logp - logp`` (k1);
        * ``kl_to_ref`` (with ``ref_logp``), ``entropy`` (with ``entropy``), ``num_tokens``;
        * ``loss_mask_fraction`` (with ``loss_mask``): selected / valid tokens.

    A valid ``logp = -inf`` (log-ratio ``-inf``: ratio 0 at every token whose trace includes it)
    keeps the loss and its gradients finite for every style: the clip bounds it (module
    docstring). The metrics that average the log-ratio itself (``trace_abs_mean``,
    ``log_ratio_abs_mean``, ``approx_kl``) are then ``inf``, as the quantity is; ``kl_to_ref`` too.

    Empty batches (``B = 0``) and empty sequences (``T = 0``) give a finite loss 0 that is still
    connected to ``logp`` (``backward`` works, the gradient is empty), so a rank with an empty
    micro-batch can take part in a distributed backward.

    Raises:
        ValueError: on shapes, dtypes, devices, ``clip_eps``, ``aggregation``, coefficient or
            ``style`` errors (the message names the argument).
    """
    # ---- validation
    style = _check_style(style)
    _check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    _check_float("old_logp", old_logp, shape=logp.shape, like=logp)
    if old_logp.requires_grad:
        raise ValueError("old_logp must not require grad (pass old_logp.detach()): the old policy is a constant")
    mask = _check_mask(mask, logp, "logp")
    _check_float("advantages", advantages, like=logp)
    if advantages.shape in ((B,), (B, 1)):
        per_token_adv = False
    elif advantages.shape == (B, T):
        per_token_adv = True
    else:
        raise ValueError(f"advantages must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(advantages.shape)}")
    low_high = parse_clip_eps(clip_eps)
    aggregation = normalize_aggregation(aggregation)
    scale = _check_scale_factor(loss_scale_factor, aggregation)
    clamp_min = check_clamp_min(clamp_min)
    if loss_mask is not None:
        loss_mask = _check_mask(loss_mask, logp, "logp", name="loss_mask")
    if not _is_real(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a float >= 0, got {kl_coef!r}")
    if not _is_real(entropy_coef):
        raise ValueError(f"entropy_coef must be a finite float, got {entropy_coef!r}")
    if ref_logp is not None:
        _check_float("ref_logp", ref_logp, shape=logp.shape, like=logp)
    elif kl_coef > 0:
        raise ValueError("kl_coef > 0 needs ref_logp [B, T] (reference-policy log-probs)")
    if entropy is not None:
        _check_float("entropy", entropy, shape=logp.shape, like=logp)
    elif entropy_coef != 0:
        raise ValueError("entropy_coef != 0 needs entropy [B, T] (per-token policy entropy)")

    # ---- compute in float32 for half inputs (ratios of bf16 log-probs are too coarse)
    cdt = torch.float32 if logp.dtype in _HALF else logp.dtype
    zero = torch.zeros((), dtype=cdt, device=logp.device)
    lp = logp.to(cdt)
    old = old_logp.to(cdt)
    x = torch.where(mask, lp - old, zero)  # [B, T] untraced log-ratio, NaN-free (where, not multiply)
    traced = not (style is None or style.is_identity() or x.numel() == 0)
    z = _F.eligibility_trace(x, mask, style, backend=backend) if traced else x  # [B, T], 0 where masked

    adv = advantages.to(cdt)
    adv = adv.reshape(B, 1) if not per_token_adv else torch.where(mask, adv, zero)  # [B, 1] or [B, T]
    adv_c = adv if clamp_min is None else adv.clamp_min(clamp_min)  # [B, 1] or [B, T]
    per_tok, clipped = clipped_surrogate(z, adv_c, low_high)  # [B, T]
    if loss_mask is not None:
        per_tok = torch.where(loss_mask, per_tok, zero)  # [B, T] policy term of the selected tokens
    loss_policy = aggregate(per_tok, mask, aggregation, loss_scale_factor=scale)
    loss = loss_policy

    metrics: Dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        d = torch.where(mask, ref_logp.to(cdt) - lp, zero)  # [B, T]
        kl = d.exp() - d - 1.0  # [B, T] k3 estimator, >= 0
        kl_agg = aggregate(kl, mask, aggregation, loss_scale_factor=scale)
        metrics["kl_to_ref"] = kl_agg.detach()
        if kl_coef > 0:
            loss_kl = kl_coef * kl_agg
            loss = loss + loss_kl
            metrics["loss_kl"] = loss_kl.detach()
    if entropy is not None:
        ent = aggregate(torch.where(mask, entropy.to(cdt), zero), mask, aggregation, loss_scale_factor=scale)
        metrics["entropy"] = ent.detach()
        if entropy_coef != 0:
            loss_ent = -entropy_coef * ent
            loss = loss + loss_ent
            metrics["loss_entropy"] = loss_ent.detach()

    # metrics without masking passes: z, x and clipped are exactly 0 / False outside the mask
    # (0 lies inside every clip range), so plain sums over [B, T] are sums over the valid tokens
    with torch.no_grad():
        n_valid = mask.sum()
        n = n_valid.clamp_min(1).to(cdt)
        metrics["loss_policy"] = loss_policy.detach()
        metrics["trace_abs_mean"] = z.abs().sum() / n
        metrics["log_ratio_abs_mean"] = x.abs().sum() / n if traced else metrics["trace_abs_mean"].clone()
        if clamp_min is None:
            metrics["adv_clamped_fraction"] = zero.clone()
        elif per_token_adv:
            metrics["adv_clamped_fraction"] = _masked_mean((adv < clamp_min).to(cdt), mask)
        else:
            metrics["adv_clamped_fraction"] = (adv < clamp_min).to(cdt).mean() if B else zero.clone()
        metrics["traced_clip_fraction"] = clipped.sum().to(cdt) / n
        # exp(0) = 1 at each masked position: subtract their count (sum in float64: no cancellation)
        exp_sum = z.exp().sum(dtype=torch.float64) - (z.numel() - n_valid).to(torch.float64)
        metrics["ratio_mean"] = (exp_sum / n.to(torch.float64)).to(cdt) if z.numel() else zero.clone()
        metrics["approx_kl"] = -x.sum() / n
        metrics["num_tokens"] = n_valid.to(cdt)
        if loss_mask is not None:
            metrics["loss_mask_fraction"] = (loss_mask & mask).sum().to(cdt) / n
    return loss, metrics
