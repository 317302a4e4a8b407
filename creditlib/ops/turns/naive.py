"""Plain definitions of the turn credit: Python loops over rows, turns and tokens, float64 (Python
floats). The ground truth :mod:`creditlib.ops.turns.vectorised` is tested against; slow, for tests
and small examples only. Inputs are taken as valid (the checks live in ``_check.py``).

Definitions (``docs`` and ``creditlib.functional.turn_credit``): the turns of row ``i`` are
``k = 0 .. K_i - 1`` (``K_i`` = largest turn id + 1), ``r_{i,k} = turn_rewards[i, k] + [k = K_i - 1]
rewards[i]`` (a row without turns: ``G_{i,0} = rewards[i]``), ``G_{i,k} = sum_{k' >= k}
gamma^(k' - k) r_{i,k'}``; ``s`` = unbiased std of the stated set + ``eps`` (``scale="std"``) or 1,
and a zero ``s`` gives 0.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from ..prefix.naive import prefix_values_naive

__all__ = ["turn_ids_from_mask_naive", "turn_ends_naive", "turn_returns_naive", "turn_credit_naive",
           "implicit_process_rewards_naive"]


def _std(vals: List[float]) -> float:
    n = len(vals)
    if n < 2:
        return 0.0
    m = sum(vals) / n
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))


def _div(num: float, vals: List[float], scale: str, eps: float) -> float:
    """``num / s`` with ``s`` the std of ``vals`` + eps (or 1); 0 when ``s = 0``."""
    s = _std(vals) + eps if scale == "std" else 1.0
    return num / s if s > 0 else 0.0


def _groups(B: int, group_size: Optional[int], group_ids) -> Dict[int, List[int]]:
    """group key -> its rows, in row order; and row -> its group's rows."""
    out: Dict[object, List[int]] = {}
    for i in range(B):
        key = i // group_size if group_ids is None else int(group_ids[i])
        out.setdefault(key, []).append(i)
    return {i: rows for rows in out.values() for i in rows}


def turn_ids_from_mask_naive(mask: torch.Tensor, boundary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 ``[B, T]``: a new turn at each valid token whose previous position is masked or a boundary."""
    B, T = mask.shape
    out = [[-1] * T for _ in range(B)]
    m = mask.bool().tolist()
    bd = boundary.bool().tolist() if boundary is not None else [[False] * T for _ in range(B)]
    for i in range(B):
        k = -1
        for t in range(T):
            if m[i][t]:
                if t == 0 or not m[i][t - 1] or bd[i][t - 1]:
                    k += 1
                out[i][t] = k
    return torch.tensor(out, dtype=torch.int64).reshape(B, T)


def _turns(row: List[int]) -> int:
    return max(row, default=-1) + 1


def turn_ends_naive(turn_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, T]``: the last valid token of each turn."""
    B, T = turn_ids.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for i, row in enumerate(turn_ids.tolist()):
        last = {}
        for t, k in enumerate(row):
            if k >= 0:
                last[k] = t
        for t in last.values():
            out[i, t] = True
    return out


def turn_returns_naive(turn_ids: torch.Tensor, turn_rewards: Optional[torch.Tensor] = None,
                       rewards: Optional[torch.Tensor] = None, gamma: float = 1.0) -> torch.Tensor:
    """float64 ``[B, max(K, 1)]``: ``G_{i,k}`` by a backward loop over each row's turns."""
    ids = turn_ids.tolist()
    B = len(ids)
    Ks = [_turns(row) for row in ids]
    K = turn_rewards.shape[1] if turn_rewards is not None else max(Ks, default=0)
    W = max(K, 1)
    tr = turn_rewards.double().tolist() if turn_rewards is not None else [[0.0] * K for _ in range(B)]
    R = rewards.double().tolist() if rewards is not None else [0.0] * B
    out = torch.zeros(B, W, dtype=torch.float64)
    for i in range(B):
        n = max(Ks[i], 1)
        r = [tr[i][k] if k < K else 0.0 for k in range(n)]
        r[n - 1] += R[i]
        acc = 0.0
        for k in reversed(range(n)):
            acc = r[k] + gamma * acc
            out[i, k] = acc
    return out


def turn_credit_naive(kind: str, turn_ids: torch.Tensor, turn_rewards: Optional[torch.Tensor] = None,
                      rewards: Optional[torch.Tensor] = None, group_size: Optional[int] = None, *,
                      group_ids=None, state_ids: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
                      gamma: float = 1.0, omega: float = 1.0, gae_gamma: float = 1.0, gae_lam: float = 1.0,
                      scale: str = "std", eps: float = 1e-4, per_turn: bool = False) -> torch.Tensor:
    """The four rules of :func:`creditlib.functional.turn_credit`, one row and turn at a time.

    Returns float64 ``[B, T]`` (``A[i, turn_ids[i, t]]`` at valid tokens, 0 elsewhere) or, with
    ``per_turn``, ``[B, max(K, 1)]``.
    """
    ids = turn_ids.tolist()
    B = len(ids)
    T = turn_ids.shape[1]
    Ks = [_turns(row) for row in ids]
    G = turn_returns_naive(turn_ids, turn_rewards, rewards, gamma).tolist()  # [B][W]
    W = len(G[0]) if B else max(turn_rewards.shape[1] if turn_rewards is not None else 0, 1)
    if state_ids is not None and turn_rewards is None:
        W = max(state_ids.shape[1], 1)
        G = [g + [0.0] * (W - len(g)) for g in G]
    group = _groups(B, group_size, group_ids)
    st = state_ids.tolist() if state_ids is not None else None
    A = [[0.0] * W for _ in range(B)]

    def episode(i: int) -> float:
        others = [G[j][0] for j in group[i] if j != i]
        if not others:
            return 0.0
        return _div(G[i][0] - sum(others) / len(others), [G[j][0] for j in group[i]], scale, eps)

    if kind == "prefix-turn":
        R = torch.tensor([G[i][0] for i in range(B)], dtype=torch.float64)  # gamma = 1: the totals
        mask = turn_ids >= 0
        V = prefix_values_naive(tokens, mask, R, group_size, group_ids=group_ids).tolist()  # [B][T]
        d = gae_gamma * gae_lam
        for i in range(B):
            if len(group[i]) < 2 or Ks[i] == 0:
                continue
            first: Dict[int, int] = {}
            for t, k in enumerate(ids[i]):
                if k >= 0 and k not in first:
                    first[k] = t
            turns = sorted(first)
            D = [0.0] * Ks[i]
            for a, k in enumerate(turns):  # V(start of the next turn with tokens) - V(start of this one)
                nxt = V[i][first[turns[a + 1]]] if a + 1 < len(turns) else G[i][0]
                D[k] = _div(nxt - V[i][first[k]], [G[j][0] for j in group[i]], scale, eps)
            for k in range(Ks[i]):
                A[i][k] = sum(d ** (k2 - k) * D[k2] for k2 in range(k, Ks[i]))
    else:
        for i in range(B):
            aE = episode(i)
            for k in range(Ks[i]):
                if kind == "turn-grpo":
                    A[i][k] = aE
                elif kind == "turn-index":
                    reached = [j for j in group[i] if Ks[j] > k]
                    others = [G[j][k] for j in reached if j != i]
                    if others:
                        A[i][k] = _div(G[i][k] - sum(others) / len(others), [G[j][k] for j in reached], scale, eps)
                elif kind == "anchor-state":
                    u = st[i][k]
                    aS = 0.0
                    if u != -1:
                        same = [(j, k2) for j in group[i] for k2 in range(Ks[j]) if st[j][k2] == u]
                        others = [G[j][k2] for j, k2 in same if j != i]
                        if others:
                            aS = _div(G[i][k] - sum(others) / len(others), [G[j][k2] for j, k2 in same], scale, eps)
                    A[i][k] = aE + omega * aS
                else:  # pragma: no cover
                    raise ValueError(f"unknown kind {kind!r}")
    if per_turn:
        return torch.tensor(A, dtype=torch.float64).reshape(B, W)
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t, k in enumerate(ids[i]):
            if k >= 0:
                out[i, t] = A[i][k]
    return out


def implicit_process_rewards_naive(log_ratio: torch.Tensor, turn_ids: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """float64 ``[B, max_i K_i]``: ``beta`` times the sum of each step's valid log-ratios."""
    ids = turn_ids.tolist()
    K = max((_turns(row) for row in ids), default=0)
    out = torch.zeros(len(ids), K, dtype=torch.float64)
    x = log_ratio.double().tolist()
    for i, row in enumerate(ids):
        for t, k in enumerate(row):
            if k >= 0:
                out[i, k] += beta * x[i][t]
    return out
