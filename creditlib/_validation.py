"""The one validation module of creditlib: every layer checks its arguments through these helpers.

Each helper raises :class:`ValueError` naming the argument and what was expected, and returns the
(possibly converted) value, so that a call site reads ``x = check_float("x", x)``. torch only.

Masks: every mask the library takes (``mask``, ``loss_mask``, ``boundary``, a selection) is a
bool tensor or an integer tensor (``int64`` 0/1, as Hugging Face tokenizers and TRL produce), where
nonzero = valid, exactly ``mask.bool()``; a floating mask is refused with a message that says
``.bool()``. :func:`as_bool_mask` is the one place that rule is written.

The option vocabulary (one name per concept; :data:`SCALES`, :data:`BASELINES`): ``scale`` is
``"std"`` or ``"none"``, ``baseline`` is ``"mean"`` or ``"loo"``, the groups are ``group_size``
or ``group_ids`` (exactly one), ``eps`` is a finite float ``>= 0`` added to the group std, the
trace weights are a ``style`` (:class:`~creditlib.DecayStyle`), the trace kernel is ``backend``.

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
    "SCALES",
    "BASELINES",
    "as_bool_mask",
    "check_style",
    "check_scale",
    "check_baseline",
    "check_eps",
    "check_groups",
    "check_choice",
    "compiling",
    "deprecated_alias",
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
#: ``scale``: divide by the group std + eps (``"std"``, GRPO) or not (``"none"``, Dr. GRPO).
SCALES = ("std", "none")
#: ``baseline``: the group mean (``"mean"``, GRPO) or the mean of the other members (``"loo"``, RLOO).
BASELINES = ("mean", "loo")


def compiling() -> bool:
    """True while ``torch.compile`` traces: data-dependent checks (a ``.item()``, a Python branch on
    a tensor value) are skipped then, so that the functions compile with ``fullgraph=True``."""
    return torch.compiler.is_compiling()


def deprecated_alias(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (kept working for one release)."""
    import warnings

    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def check_choice(name: str, v, allowed) -> str:
    """``v`` must be one of the strings ``allowed``."""
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {v!r}")
    return v


def check_scale(v, name: str = "scale") -> str:
    """``"std"`` or ``"none"``."""
    return check_choice(name, v, SCALES)


def check_baseline(v, name: str = "baseline") -> str:
    """``"mean"`` or ``"loo"``."""
    return check_choice(name, v, BASELINES)


def check_eps(v, name: str = "eps") -> float:
    """A finite real number ``>= 0`` (the constant added to a group std), as a float."""
    if not is_real(v) or float(v) < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    return float(v)


def check_style(style, *, allow_none: bool = False, name: str = "style"):
    """``style`` must be a :class:`~creditlib.DecayStyle` (or ``None`` when ``allow_none``: plain GRPO)."""
    from .style import DecayStyle

    if style is None and allow_none:
        return None
    if not isinstance(style, DecayStyle):
        what = "a creditlib.DecayStyle or None (plain GRPO)" if allow_none else \
            "a creditlib.DecayStyle (e.g. DecayStyle('recent', lam=0.99))"
        raise ValueError(f"{name} must be {what}, got {type(style).__name__}")
    return style


def check_groups(group_size, group_ids, *, ids_name: str = "group_ids") -> Optional[int]:
    """Exactly one of ``group_size`` (a positive int, returned) and ``group_ids`` must be given."""
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"give exactly one of group_size or {ids_name}")
    return None if group_size is None else check_positive_int("group_size", group_size)


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


def as_bool_mask(mask, name: str = "mask") -> torch.Tensor:
    """The one mask rule: a bool tensor, or an integer tensor (nonzero = valid, ``mask.bool()``).

    Returns a bool tensor (``mask`` itself when it is bool; ``mask != 0`` for an integer mask, such
    as the ``int64`` 0/1 attention and completion masks of Hugging Face and TRL). A floating or
    complex mask is a ``ValueError`` (a float mask may hold weights: pass ``mask.bool()`` if it is
    0/1). Any nonzero byte of a bool tensor counts as True (a ``uint8`` tensor viewed as bool may
    hold bytes other than 0 and 1); the kernels treat it so.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool or integer (0/1) torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be a bool or integer (0/1) tensor (nonzero = valid token), got dtype "
                         f"{mask.dtype}: pass {name}.bool() if it holds 0/1")
    return mask != 0


def check_mask(mask, like: torch.Tensor, like_name: str = "x", name: str = "mask") -> torch.Tensor:
    """``mask`` must be a bool or integer tensor (nonzero = valid token, :func:`as_bool_mask`) with
    the shape and device of ``like``. Returns the bool mask: call sites use the result."""
    mask = as_bool_mask(mask, name)
    if mask.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal {like_name} shape {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but {like_name} is on {like.device}")
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
