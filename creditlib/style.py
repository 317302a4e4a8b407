"""`DecayStyle`: which eligibility-trace weights w(t, j) to use (see docs/trace.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._validation import check_unit

STYLES = ("recent", "both", "sequence")


@dataclass(frozen=True)
class DecayStyle:
    """Weights of the eligibility trace over token log-ratios (GRPO-lambda, arXiv 2510.00194).

    With ``d = gamma * lam`` and positions ``t, j`` counted over the valid tokens of one sample:

    * ``"recent"``: ``w(t, j) = d**(t - j)`` (the classic accumulating trace);
    * ``"both"``:   ``w(t, j) = max(d**(t - j), d**j)`` (credit to the latest and the earliest tokens);
    * ``eps`` floor: ``w(t, j) = max(w(t, j), eps)`` for ``j <= t``;

    always ``w(t, t) = 1``, ``w(t, j) = 0`` for ``j > t`` and ``0**0 = 1``.
    ``DecayStyle("recent", lam=0.0)`` is plain GRPO (``z_t = x_t``).

    ``normalize=True`` divides each row by its sum, ``w(t, j) / sum_{i <= t} w(t, i)``: ``z_t`` is a
    weighted *mean* of the earlier log-ratios (``d = 0`` is still GRPO; ``"recent"`` with ``d = 1``
    is the causal running mean). The row sum depends only on the valid position ``t``.

    ``"sequence"`` (GSPO, arXiv 2507.18071): ``w(t, j) = 1/n`` for every valid ``j`` of the row
    (``n`` valid tokens; not causal), so every token carries the sequence-level mean log-ratio.
    ``gamma``, ``lam``, ``eps`` and ``normalize`` are accepted (still range-checked) and ignored
    for this style: its rows already sum to 1.

    Args:
        style: ``"recent"``, ``"both"`` or ``"sequence"``.
        gamma: discount in [0, 1].
        lam: trace decay lambda in [0, 1].
        eps: weight floor in [0, 1] (0 disables the floor).
        normalize: row-normalise the weights.
    """

    style: str = "recent"
    gamma: float = 1.0
    lam: float = 0.99
    eps: float = 0.0
    normalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        object.__setattr__(self, "gamma", check_unit("gamma", self.gamma))
        object.__setattr__(self, "lam", check_unit("lam", self.lam))
        object.__setattr__(self, "eps", check_unit("eps", self.eps))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    @property
    def decay(self) -> float:
        """``d = gamma * lam`` as a Python float (float64: never round it to float32)."""
        return self.gamma * self.lam

    @property
    def both(self) -> bool:
        return self.style == "both"

    @property
    def sequence(self) -> bool:
        return self.style == "sequence"

    @property
    def window(self) -> int | None:
        """Largest lag ``L`` with ``d**L >= eps`` (``None``: the floor never binds).

        Beyond lag ``L`` the floor ``eps`` replaces the decayed weight. ``None`` when ``eps == 0``
        or ``d == 1`` (no floor is active) and for ``"sequence"``; ``0`` when ``d == 0`` or
        ``eps == 1``.
        """
        if self.sequence:
            return None
        return decay_window(self.decay, self.eps)

    def is_identity(self) -> bool:
        """True when the trace is the identity (``z_t = x_t``): plain GRPO."""
        return not self.sequence and self.decay == 0.0 and self.eps == 0.0 and not self.both

    def __str__(self) -> str:
        if self.sequence:
            return "sequence"
        s = f"{self.style}(gamma={self.gamma:g}, lam={self.lam:g}"
        s += f", eps={self.eps:g}" if self.eps else ""
        return s + (", normalize=True)" if self.normalize else ")")


def decay_window(d: float, eps: float) -> int | None:
    """Largest lag ``L`` with ``d**L >= eps``; ``None`` when the floor never binds (``eps == 0``
    or ``d == 1``), ``0`` when ``d == 0`` or ``eps == 1``."""
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
