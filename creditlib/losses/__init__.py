"""creditlib.losses: the GRPO-lambda objective.

* :func:`grpo_lambda_loss` -- plain tensors in, ``(loss, metrics)`` out: for any trainer (TRL,
  verl, a custom loop). Its building blocks live in :mod:`creditlib.losses.functional`.
* :class:`GRPOLambdaLoss` -- a subclass of TorchRL's ``GRPOLoss`` (imported lazily, so the
  plain-tensor loss does not need TorchRL).

See ``docs/torchrl.md``.
"""

from .functional import (
    AGGREGATIONS,
    aggregate,
    aggregation_weights,
    clamp_advantages,
    clipped_surrogate,
    clipped_surrogate_log_bounds,
    grpo_lambda_loss,
    normalize_aggregation,
    parse_clip_eps,
    traced_log_ratio,
)

__all__ = [
    "AGGREGATIONS",
    "GRPOLambdaLoss",
    "GRPOLambdaLossOutput",
    "aggregate",
    "aggregation_weights",
    "clamp_advantages",
    "clipped_surrogate",
    "clipped_surrogate_log_bounds",
    "grpo_lambda_loss",
    "normalize_aggregation",
    "parse_clip_eps",
    "traced_log_ratio",
]


def __getattr__(name):  # TorchRL is heavy to import: load it only when the class is asked for
    if name in ("GRPOLambdaLoss", "GRPOLambdaLossOutput"):
        from .._extras import require

        require("torchrl", f"creditlib.losses.{name}")
        from . import grpo_lambda
        return getattr(grpo_lambda, name)
    raise AttributeError(f"module 'creditlib.losses' has no attribute {name!r}")
