"""`DecayStyle`: which eligibility-trace weights w(t, j) to use (see docs/trace.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

STYLES = ("recent", "both")


def _check_unit(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class DecayStyle:
    """Weights of the eligibility trace over token log-ratios (GRPO-lambda, arXiv 2510.00194).

    With ``d = gamma * lam`` and positions ``t, j`` counted over the valid tokens of one sample:

    * ``"recent"``: ``w(t, j) = d**(t - j)`` (the classic accumulating trace);
    * ``"both"``:   ``w(t, j) = max(d**(t - j), d**j)`` (credit to the latest and the earliest tokens);
    * ``eps`` floor: ``w(t, j) = max(w(t, j), eps)`` for ``j <= t``;

    always ``w(t, t) = 1``, ``w(t, j) = 0`` for ``j > t`` and ``0**0 = 1``.
    ``DecayStyle("recent", lam=0.0)`` is plain GRPO (``z_t = x_t``).

    Args:
        style: ``"recent"`` or ``"both"``.
        gamma: discount in [0, 1].
        lam: trace decay lambda in [0, 1].
        eps: weight floor in [0, 1] (0 disables the floor).
    """

    style: str = "recent"
    gamma: float = 1.0
    lam: float = 0.99
    eps: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        object.__setattr__(self, "gamma", _check_unit("gamma", self.gamma))
        object.__setattr__(self, "lam", _check_unit("lam", self.lam))
        object.__setattr__(self, "eps", _check_unit("eps", self.eps))

    @property
    def decay(self) -> float:
        """``d = gamma * lam`` as a Python float (float64: never round it to float32)."""
        return self.gamma * self.lam

    @property
    def both(self) -> bool:
        return self.style == "both"

    @property
    def window(self) -> int | None:
        """Largest lag ``L`` with ``d**L >= eps`` (``None``: the floor never binds).

        Beyond lag ``L`` the floor ``eps`` replaces the decayed weight. ``None`` when ``eps == 0``
        or ``d == 1`` (no floor is active); ``0`` when ``d == 0`` or ``eps == 1``.
        """
        d, eps = self.decay, self.eps
        if eps <= 0.0 or d >= 1.0:
            return None
        if d <= 0.0 or eps >= 1.0:
            return 0
        k = int(math.floor(math.log(eps) / math.log(d)))
        k = max(k, 0)
        while d ** (k + 1) >= eps:  # guard against log rounding
            k += 1
        while k > 0 and d**k < eps:
            k -= 1
        return k

    def is_identity(self) -> bool:
        """True when the trace is the identity (``z_t = x_t``): plain GRPO."""
        return self.decay == 0.0 and self.eps == 0.0 and not self.both

    def __str__(self) -> str:
        s = f"{self.style}(gamma={self.gamma:g}, lam={self.lam:g}"
        return s + (f", eps={self.eps:g})" if self.eps else ")")
