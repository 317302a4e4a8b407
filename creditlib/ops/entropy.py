"""Entropy-selected tokens ("forking tokens", the 80/20 rule): ``entropy_mask`` and its definition.

    keep = entropy_mask(entropy, mask, quantile=0.2)              # bool [B, T]

:func:`entropy_mask` is the implementation behind the public ``creditlib.functional.entropy_mask``
(one opaque custom op, ``creditlib::entropy_mask``); :func:`entropy_mask_naive` is its plain
definition (a Python sort), which ``tests/test_entropy_mask.py`` holds it against.
"""

from __future__ import annotations

import torch

from .._validation import check_float, check_mask, check_quantile
from .prefix.vectorised import _canonical

__all__ = ["entropy_mask", "entropy_mask_naive"]

# torch.quantile refuses inputs with more than 2**24 elements
_TORCH_QUANTILE_MAX = 1 << 24


def _quantile(v: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.quantile(v, p)`` (linear interpolation) for 1-D float32 ``v`` of any size.

    Up to 2**24 elements this is ``torch.quantile`` itself. Beyond (where it raises), the same
    arithmetic with two ``kthvalue`` selections: rank ``p (N - 1)`` (float64, since float32 no
    longer holds every index), floor and ceil neighbours, ``torch.lerp`` with the float32 weight.
    """
    N = v.numel()
    if N <= _TORCH_QUANTILE_MAX:
        return torch.quantile(v, p)
    return _quantile_kth(v, p)


def _quantile_kth(v: torch.Tensor, p: float) -> torch.Tensor:
    N = v.numel()
    if N - 1 <= _TORCH_QUANTILE_MAX:  # torch.quantile's float32 rank, bit for bit
        rank = float(torch.tensor(p, dtype=torch.float32) * (N - 1))
    else:
        rank = p * (N - 1)
    rank = min(max(rank, 0.0), float(N - 1))
    lo = int(rank)
    hi = min(lo + (1 if rank > lo else 0), N - 1)
    w = torch.tensor(rank - lo, dtype=v.dtype, device=v.device)
    v_lo = torch.kthvalue(v, lo + 1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(v, hi + 1).values
    return torch.lerp(v_lo, v_hi, w)


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The top-``quantile`` entropy tokens ("forking tokens", the 80/20 rule): bool ``[B, T]``.

    ``mask & (entropy >= q)`` with ``q = torch.quantile(entropy[mask].float(), 1 - quantile)``
    over the whole batch (linear interpolation). The comparison is made in float32 (float64 for
    float64 entropies), as TRL's ``GRPOTrainer.get_high_entropy_mask``.

    Args:
        entropy: float ``[..., T]`` per-token entropies (any sign; finite at valid positions).
        mask: bool or integer (nonzero = valid token), same shape.
        quantile: in ``(0, 1]``: the fraction of valid tokens kept (1 keeps every valid token).
    Returns:
        bool ``[..., T]``; all False when no token is valid. Inputs of any size (``torch.quantile``
        stops at 2**24 elements; beyond that a ``kthvalue`` form with the same arithmetic).

    ``torch.compile(fullgraph=True)`` compiles it (one opaque custom op, ``creditlib::entropy_mask``).
    """
    entropy = check_float("entropy", entropy)
    mask = check_mask(mask, entropy, "entropy")
    quantile = check_quantile(quantile)
    return _entropy_mask_op(entropy.detach(), mask, quantile)


@torch.library.custom_op("creditlib::entropy_mask", mutates_args=())
def _entropy_mask_op(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    e = entropy
    mask = _canonical(mask)
    vals = e[mask].float()  # [N] valid entropies
    if vals.numel() == 0:
        return torch.zeros_like(mask)
    fin = torch.isfinite(vals)  # [N]
    if not bool(fin.all()):
        i = int((~fin).nonzero()[0, 0])
        where = tuple(int(c) for c in mask.nonzero()[i])
        raise ValueError(f"entropy must be finite at valid positions: entropy[{where}] = {float(vals[i])}")
    q = _quantile(vals, 1.0 - quantile)  # float32 scalar
    cmp = torch.promote_types(e.dtype, torch.float32)
    return mask & (e.to(cmp) >= q)  # [..., T]


@_entropy_mask_op.register_fake
def _(entropy, mask, quantile):
    return torch.empty_like(mask)  # bool [..., T]


# ----------------------------------------------------------------------------- the definition
def entropy_mask_naive(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``mask & (entropy >= q)``, ``q`` the ``1 - quantile`` quantile (linear interpolation, as
    ``torch.quantile``) of the valid entropies rounded to float32, computed by sorting in Python;
    the comparison is made in float64 (exact for every input dtype)."""
    vals = sorted(float(v) for v, m in zip(entropy.float().reshape(-1).tolist(), mask.reshape(-1).tolist()) if m)
    if not vals:
        return torch.zeros(entropy.shape, dtype=torch.bool)
    # torch.quantile's arithmetic: rank = q * (N - 1) in float32, lerp between the neighbours
    q32 = torch.tensor(1.0 - quantile, dtype=torch.float32)
    rank = float(q32 * (len(vals) - 1))
    lo = int(rank)
    hi = min(lo + (1 if rank > lo else 0), len(vals) - 1)
    w = torch.tensor(rank - lo, dtype=torch.float32)
    thr = torch.lerp(torch.tensor(vals[lo], dtype=torch.float32), torch.tensor(vals[hi], dtype=torch.float32), w)
    # compared in float64: exact for half/float32 entropies, and float64 ones stay float64
    keep = [[bool(m) and float(e) >= float(thr) for e, m in zip(er, mr)]
            for er, mr in zip(entropy.double().reshape(-1, entropy.shape[-1]).tolist(),
                              mask.reshape(-1, mask.shape[-1]).tolist())]
    return torch.tensor(keep, dtype=torch.bool).reshape(entropy.shape)
