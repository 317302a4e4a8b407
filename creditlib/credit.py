"""creditlib.credit: the registry of credit-assignment methods (one name = one configuration).

A :class:`CreditMethod` bundles every choice a trainer makes about credit assignment:

* how a completion's reward becomes an advantage (``advantage="group"``: the per-sequence
  GRPO/RLOO advantage of :func:`creditlib.functional.group_advantage`; ``"prefix_td"``: the
  per-token prefix-tree TD error of :func:`creditlib.functional.prefix_td` with GAE(gamma, lam)
  over it), then the negative-advantage clamp;
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

This module imports torch only (no tensordict): every trainer can use it.
"""

from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass, replace as _dc_replace
from typing import Dict, List, Optional

import torch

from . import functional as F
from ._validation import check_clamp_min, check_quantile, check_unit
from .style import DecayStyle

__all__ = ["CreditMethod", "register_credit", "get_credit", "list_credits", "ADVANTAGES", "SCALES", "BASELINES"]

ADVANTAGES = ("group", "prefix_td")
SCALES = ("std", "none")
BASELINES = ("mean", "loo")


def _choice(name: str, v, allowed) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    return v


@dataclass(frozen=True)
class CreditMethod:
    """One credit-assignment configuration, selectable by ``name``.

    Args:
        name: registry name (lower-case, e.g. ``"grpo-lambda"``).
        advantage: ``"group"`` (per-sequence advantage ``[B]``, GRPO / RLOO) or ``"prefix_td"``
            (per-token ``[B, T]``: GAE(gamma, lam) over the group prefix-tree TD error).
        scale: ``"std"`` (divide by the group std + 1e-4) or ``"none"`` (Dr. GRPO).
        baseline: ``"mean"`` (GRPO) or ``"loo"`` (RLOO); ``advantage="group"`` only (the prefix
            TD error is leave-one-out by construction).
        gamma, lam: GAE over the prefix TD error, in [0, 1]; ``advantage="prefix_td"`` only
            (``gamma = lam = 1``: token ``k`` gets the RLOO advantage with a prefix-conditioned
            baseline).
        clamp_min: negative-advantage clamp ``max(A, clamp_min)``: ``None`` or a finite float
            ``<= 0`` (the one clamp rule of the library).
        trace: the log-ratio style used inside the loss (``DecayStyle``), ``None`` for the plain
            token ratio.
        entropy_quantile: keep only the top ``entropy_quantile`` fraction of valid tokens by
            entropy in the loss (in (0, 1]); ``None`` keeps every valid token.
        description: one line for ``--help`` and the docs.
    """

    name: str
    advantage: str = "group"
    scale: str = "std"
    baseline: str = "mean"
    gamma: float = 1.0
    lam: float = 1.0
    clamp_min: Optional[float] = None
    trace: Optional[DecayStyle] = None
    entropy_quantile: Optional[float] = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        _choice("advantage", self.advantage, ADVANTAGES)
        _choice("scale", self.scale, SCALES)
        _choice("baseline", self.baseline, BASELINES)
        object.__setattr__(self, "gamma", check_unit("gamma", self.gamma))
        object.__setattr__(self, "lam", check_unit("lam", self.lam))
        if self.advantage == "group":
            if (self.gamma, self.lam) != (1.0, 1.0):
                raise ValueError(f"gamma and lam apply to advantage='prefix_td' only; got gamma={self.gamma}, "
                                 f"lam={self.lam} with advantage='group'")
        elif self.baseline != "mean":
            raise ValueError("baseline='loo' applies to advantage='group' only (the prefix TD error is "
                             "leave-one-out by construction)")
        object.__setattr__(self, "clamp_min", check_clamp_min(self.clamp_min))
        if self.trace is not None and not isinstance(self.trace, DecayStyle):
            raise ValueError(f"trace must be a creditlib.DecayStyle or None, got {type(self.trace).__name__}")
        if self.entropy_quantile is not None:
            object.__setattr__(self, "entropy_quantile", check_quantile(self.entropy_quantile, "entropy_quantile"))
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a string, got {type(self.description).__name__}")

    # ------------------------------------------------------------------ properties
    @property
    def per_token(self) -> bool:
        """True when :meth:`advantages` returns per-token ``[B, T]`` advantages."""
        return self.advantage == "prefix_td"

    @property
    def needs_tokens(self) -> bool:
        """True when :meth:`advantages` needs the completion token ids."""
        return self.advantage == "prefix_td"

    @property
    def needs_entropy(self) -> bool:
        """True when :meth:`loss_mask` needs per-token entropies."""
        return self.entropy_quantile is not None

    @property
    def gae_style(self) -> DecayStyle:
        """``DecayStyle("recent", gamma, lam)``: GAE over the prefix TD error."""
        return DecayStyle("recent", gamma=self.gamma, lam=self.lam)

    # ------------------------------------------------------------------ computation
    def advantages(self, rewards: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                   tokens: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                   group_ids: Optional[torch.Tensor] = None,
                   boundary: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advantages of a batch of completions, clamp included.

        Args:
            rewards: float ``[B]``.
            mask: bool ``[B, T]`` of completion tokens (required for ``advantage="prefix_td"``).
            tokens: int ``[B, T]`` completion token ids (``advantage="prefix_td"`` only).
            group_size / group_ids: the groups, as in :func:`creditlib.functional.group_advantage`.
            boundary: optional bool ``[B, T]`` step ends (step-level prefix TD).
        Returns:
            ``[B]`` (``advantage="group"``) or ``[B, T]`` (``"prefix_td"``, 0 at masked positions),
            dtype of ``rewards``.
        """
        if self.advantage == "group":
            if boundary is not None:
                raise ValueError(f"boundary applies to advantage='prefix_td' only (credit method {self.name!r})")
            adv = F.group_advantage(rewards, group_size, scale=self.scale, baseline=self.baseline,
                                    group_ids=group_ids)  # [B]
        else:
            if tokens is None:
                raise ValueError(f"credit method {self.name!r} (advantage='prefix_td') needs tokens: "
                                 "the completion token ids [B, T]")
            if mask is None:
                raise ValueError(f"credit method {self.name!r} (advantage='prefix_td') needs mask: bool [B, T]")
            delta = F.prefix_td(tokens, mask, rewards, group_size, group_ids=group_ids, scale=self.scale,
                                boundary=boundary)  # [B, T]
            adv = F.traced_credit(delta, mask, self.gae_style)  # [B, T] GAE(gamma, lam)
        if self.clamp_min is not None:
            adv = adv.clamp_min(self.clamp_min)  # masked zeros stay 0 (clamp_min <= 0)
        return adv

    def loss_mask(self, mask: torch.Tensor, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bool ``[B, T]`` mask of the tokens that enter the loss.

        ``mask`` itself when ``entropy_quantile`` is None (``entropy`` is then ignored), else
        ``F.entropy_mask(entropy, mask, entropy_quantile)`` (the top-entropy "forking" tokens).
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool torch.Tensor [B, T], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if self.entropy_quantile is None:
            return mask
        if entropy is None:
            raise ValueError(f"credit method {self.name!r} (entropy_quantile={self.entropy_quantile}) needs "
                             "entropy: the per-token policy entropy [B, T]")
        return F.entropy_mask(entropy, mask, self.entropy_quantile)

    def replace(self, **changes) -> "CreditMethod":
        """A copy with some fields changed (validated again), e.g. ``m.replace(clamp_min=-0.2)``.

        The copy is not registered; give it a new ``name`` and call :func:`register_credit` to
        make it selectable by name.
        """
        return _dc_replace(self, **changes)

    def summary(self) -> str:
        """Compact one-line form of the non-default fields (for logs)."""
        parts = [f"advantage={self.advantage}", f"scale={self.scale}"]
        if self.advantage == "group":
            parts.append(f"baseline={self.baseline}")
        else:
            parts.append(f"gamma={self.gamma:g}, lam={self.lam:g}")
        if self.clamp_min is not None:
            parts.append(f"clamp_min={self.clamp_min:g}")
        if self.trace is not None:
            parts.append(f"trace={self.trace}")
        if self.entropy_quantile is not None:
            parts.append(f"entropy_quantile={self.entropy_quantile:g}")
        return f"{self.name}: " + ", ".join(parts)


# ----------------------------------------------------------------------------- the registry
_REGISTRY: Dict[str, CreditMethod] = {}
_LOCK = threading.Lock()


def register_credit(method: CreditMethod, *, overwrite: bool = False) -> CreditMethod:
    """Add a credit method to the registry: one call makes it selectable everywhere by name.

    Example::

        from creditlib import DecayStyle
        from creditlib.credit import CreditMethod, register_credit
        register_credit(CreditMethod("rloo-lambda", baseline="loo", clamp_min=-0.1,
                                     trace=DecayStyle("recent", lam=0.9),
                                     description="RLOO baseline, clamp, lambda=0.9 trace"))
        # now: recipe --credit rloo-lambda, get_credit("rloo-lambda"), the TRL/verl adapters ...

    Args:
        method: the :class:`CreditMethod`; its ``name`` is the key.
        overwrite: replace an existing method of the same name (otherwise ``ValueError``).
    Returns:
        ``method``.
    """
    if not isinstance(method, CreditMethod):
        raise ValueError(f"method must be a creditlib.credit.CreditMethod, got {type(method).__name__}")
    with _LOCK:
        if method.name in _REGISTRY and not overwrite and _REGISTRY[method.name] != method:
            raise ValueError(f"credit method {method.name!r} is already registered "
                             "(pass overwrite=True to replace it)")
        _REGISTRY[method.name] = method
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
    if m is None:
        m = _REGISTRY.get(name.strip().lower().replace("_", "-"))
    if m is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
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
    CreditMethod("prefix-gae-lambda", advantage="prefix_td", lam=0.95,
                 description="GAE(gamma=1, lam=0.95) over the prefix-tree TD error"),
    CreditMethod("entropy-80-20", entropy_quantile=0.2,
                 description="GRPO on the top-20% entropy (forking) tokens only"),
):
    register_credit(_m)
del _m
