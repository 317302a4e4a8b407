"""The one validation module of creditlib: every layer checks its arguments through these helpers.

Each helper raises :class:`ValueError` naming the argument and what was expected, and returns the
(possibly converted) value, so that a call site reads ``x = check_float("x", x)``. torch only.

The one clamp rule of the library: ``clamp_min`` is ``None`` (no clamp) or a finite real number
``<= 0``; a positive clamp (which would raise every advantage, flipping the sign of the negative
ones) is a ``ValueError`` everywhere (losses, modules, adapters, configuration).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

__all__ = [
    "FLOAT_DTYPES",
    "check_float",
    "check_mask",
    "check_unit",
    "check_clamp_min",
    "check_positive_int",
    "check_quantile",
    "is_real",
]

#: Floating dtypes accepted for log-ratios, advantages and rewards.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_real(v) -> bool:
    """True for a finite real number that is not a bool (``1.0``, ``-0.1``, ``3``; not ``nan``, ``True``)."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_float(name: str, x) -> torch.Tensor:
    """``x`` must be a floating ``torch.Tensor`` (float16, bfloat16, float32 or float64)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def check_mask(mask, like: torch.Tensor, like_name: str = "x") -> torch.Tensor:
    """``mask`` must be a bool tensor (True = valid token) with the shape and device of ``like``.

    Any nonzero byte of a bool tensor counts as True (a ``uint8`` tensor viewed as bool may hold
    bytes other than 0 and 1); the kernels treat it so.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid token), got dtype {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {like_name} shape {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {like_name} is on {like.device}")
    return mask


def check_unit(name: str, v) -> float:
    """``v`` must be a real number in ``[0, 1]`` (NaN rejected); returns it as a Python float."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a real number in [0, 1], got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number in [0, 1], got {v!r}") from None
    if not (0.0 <= f <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return f


def check_clamp_min(v, name: str = "clamp_min") -> Optional[float]:
    """The one clamp rule: ``None`` or a finite real number ``<= 0`` (returned as a float)."""
    if v is None:
        return None
    if not is_real(v):
        raise ValueError(f"{name} must be None or a finite float <= 0, got {v!r}")
    f = float(v)
    if f > 0.0:
        raise ValueError(f"{name} must be None or a finite float <= 0 (a negative-advantage clamp), got {v!r}")
    return f


def check_positive_int(name: str, v) -> int:
    """``v`` must be an int ``>= 1`` (bools rejected)."""
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def check_quantile(v, name: str = "quantile") -> float:
    """``v`` must be a real number in ``(0, 1]`` (1 keeps every token)."""
    if not is_real(v) or not (0.0 < float(v) <= 1.0):
        raise ValueError(f"{name} must be a float in (0, 1], got {v!r}")
    return float(v)
