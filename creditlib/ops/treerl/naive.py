"""The plain definition of the TreeRL credit rule (loops over groups, rows, tokens and pairs).

:func:`creditlib.ops.treerl.vectorised.treerl_advantage` is tested against this on random trees and masks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["treerl_advantage_reference"]


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def treerl_advantage_reference(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                               group_size: Optional[int] = None, *, group_ids: Optional[torch.Tensor] = None,
                               scale: str = "none", eps: float = 1e-4) -> torch.Tensor:
    """``[B, T]``: valid token ``k`` of row ``i`` gets
    ``((U_i(k) - U_root) + (U_i(k) - U_i^par(k))) / sqrt(|{j : LCP(i, j) >= k + 1}|)``, computed by
    brute force (see :mod:`creditlib.ops.treerl.vectorised`)."""
    B, T = tokens.shape
    if group_ids is None:
        group_ids = torch.arange(B) // group_size
    gids = [int(g) for g in group_ids]
    m = mask.bool()
    seqs = [[int(t) for t, v in zip(tokens[i].tolist(), m[i].tolist()) if v] for i in range(B)]
    R = [float(x) for x in rewards.double()]
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        members = [j for j in range(B) if gids[j] == gids[i]]
        if len(members) < 2:
            continue
        u_root = sum(R[j] for j in members) / len(members)
        s = 1.0
        if scale == "std":
            var = sum((R[j] - u_root) ** 2 for j in members) / (len(members) - 1)
            s = math.sqrt(var) + eps
        lcp = {j: (len(seqs[i]) if j == i else _lcp(seqs[i], seqs[j])) for j in members}
        cols = [t for t in range(T) if bool(m[i, t])]
        for k, col in enumerate(cols):
            node = [j for j in members if lcp[j] >= k + 1]
            par = [j for j in members if lcp[j] >= k]
            u = sum(R[j] for j in node) / len(node)
            u_par = sum(R[j] for j in par) / len(par)
            out[i, col] = ((u - u_root) + (u - u_par)) / math.sqrt(len(node)) / s
    return out.to(rewards.dtype)
