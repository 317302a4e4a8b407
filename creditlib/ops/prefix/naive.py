"""Plain definition of the group prefix-tree TD error (and of the values it differences).

These are the ground truth that :mod:`creditlib.ops.prefix.vectorised` is tested against: explicit
Python loops over groups, completions and tokens, a dict-based trie, float64 arithmetic (Python
floats). Slow (O(G * sum(n_i)) Python steps per group) and meant for tests and small examples only.

Definitions (``docs/design.md``, sections 4 and 5). The completions of one prompt form a
prefix tree. With ``o_i`` the valid tokens of row ``i`` in order and ``n_i`` their number, the
state before token ``k`` of ``o_i`` is the trie node reached by ``o_i[:k]``; the other members of
the group that pass through that node are the ``j != i`` with ``LCP(i, j) >= k``. Then

* ``V_i(k)`` = mean reward of those others, for ``0 <= k < n_i``; past the depth where ``o_i``
  leaves every other member, the value of the deepest node it still shares with one;
* ``V_i(n_i) = R_i`` (the completion's own reward enters only at its end, never a baseline);
* ``delta_i[k] = (V_i(k + 1) - V_i(k)) / s`` with ``s = std(R) + eps`` (unbiased std over the
  group) for ``scale="std"`` and ``s = 1`` for ``"none"``; groups of one get 0.

Step-level variant (``boundary``): the step starts of row ``i`` are compact position 0 and every
``m`` with ``1 <= m < n_i`` whose previous valid token is a boundary token. With ``b_i(k)`` the
last step start ``<= k``, ``V^step_i(k) = V_i(b_i(k))`` for ``k < n_i`` and ``V^step_i(n_i) = R_i``;
the delta uses ``V^step`` in place of ``V``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..._validation import check_groups, check_scale


class _Node:
    __slots__ = ("children", "members")

    def __init__(self):
        self.children: Dict[int, "_Node"] = {}
        self.members: List[int] = []  # group members whose valid tokens pass through this node


def _build_trie(seqs: Dict[int, List[int]]) -> _Node:
    root = _Node()
    for i, seq in seqs.items():
        node = root
        node.members.append(i)
        for tok in seq:
            node = node.children.setdefault(tok, _Node())
            node.members.append(i)
    return root


def _values(i: int, seq: List[int], root: _Node, rewards: Dict[int, float]) -> List[float]:
    """``[V_i(0), ..., V_i(n_i - 1)]`` by walking ``o_i`` down the trie."""
    out: List[float] = []
    node = root
    last: Optional[float] = None
    for k in range(len(seq)):
        if k > 0:
            node = node.children[seq[k - 1]]  # the node of the prefix o_i[:k]
        others = [j for j in node.members if j != i]
        if others:
            last = sum(rewards[j] for j in others) / len(others)
        # no other member shares o_i[:k]: keep the value of the deepest shared prefix
        out.append(last)  # type: ignore[arg-type]
    return out


def _group_rows(B: int, group_size: Optional[int], group_ids: Optional[torch.Tensor]) -> Dict[object, List[int]]:
    groups: Dict[object, List[int]] = {}
    for b in range(B):
        key = b // group_size if group_ids is None else int(group_ids[b])
        groups.setdefault(key, []).append(b)
    return groups


def prefix_td_naive(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                    group_size: Optional[int] = None, *, group_ids: Optional[torch.Tensor] = None,
                    scale: str = "std", eps: float = 1e-4,
                    boundary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prefix-tree TD error by a trie walk: ``[B, T]``, dtype of ``rewards``, 0 where masked.

    Arguments as :func:`creditlib.functional.prefix_td` (not validated here beyond the basics).
    """
    check_groups(group_size, group_ids)
    check_scale(scale)
    B, T = tokens.shape
    out = [[0.0] * T for _ in range(B)]
    tok = tokens.tolist()
    msk = mask.tolist()
    bnd = boundary.tolist() if boundary is not None else None
    rew = [float(r) for r in rewards.tolist()]
    for rows in _group_rows(B, group_size, group_ids).values():
        if len(rows) < 2:
            continue  # a group of one has no baseline: 0
        cols = {i: [t for t in range(T) if msk[i][t]] for i in rows}  # valid columns in order
        seqs = {i: [tok[i][t] for t in cols[i]] for i in rows}
        r = {i: rew[i] for i in rows}
        mean = sum(r.values()) / len(rows)
        std = (sum((v - mean) ** 2 for v in r.values()) / (len(rows) - 1)) ** 0.5
        s = std + eps if scale == "std" else 1.0
        root = _build_trie(seqs)
        for i in rows:
            n = len(seqs[i])
            if n == 0:
                continue
            V = _values(i, seqs[i], root, r)  # [n]
            if bnd is not None:
                starts = [0] + [m for m in range(1, n) if bnd[i][cols[i][m - 1]]]
                Vs = []
                for k in range(n):
                    b = max(m for m in starts if m <= k)
                    Vs.append(V[b])
                V = Vs
            V = V + [r[i]]  # V(n_i) = R_i
            for k in range(n):
                d = V[k + 1] - V[k]
                out[i][cols[i][k]] = d / s if s > 0 else 0.0
    return torch.tensor(out, dtype=torch.float64).reshape(B, T).to(rewards.dtype)


def prefix_values_naive(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                        group_size: Optional[int] = None, *,
                        group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``V_i(k)`` at the valid position ``k`` of each row (float64 ``[B, T]``, NaN where masked and
    for rows in groups of one): the leave-one-out prefix value of the state before each token."""
    B, T = tokens.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float64)  # [B, T]
    tok = tokens.tolist()
    msk = mask.tolist()
    rew = [float(r) for r in rewards.tolist()]
    for rows in _group_rows(B, group_size, group_ids).values():
        if len(rows) < 2:
            continue
        cols = {i: [t for t in range(T) if msk[i][t]] for i in rows}
        seqs = {i: [tok[i][t] for t in cols[i]] for i in rows}
        root = _build_trie(seqs)
        for i in rows:
            for k, v in enumerate(_values(i, seqs[i], root, {j: rew[j] for j in rows})):
                out[i, cols[i][k]] = v
    return out
