"""The one place the turn-credit inputs are checked (``creditlib.ops.turns``): every message names the
argument, the row (and position or turn) where relevant, and what was expected.

Shapes: ``B`` rows (trajectories), ``T`` token positions, ``K`` turn columns, ``N`` packed tokens.
The generic checks (masks, scale, eps, groups, ``[0, 1]`` options) come from
:mod:`creditlib._validation`; the group checks shared with ``prefix_td`` from
:mod:`creditlib.ops.prefix.vectorised`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._validation import as_bool_mask, check_float

__all__ = ["KINDS", "check_kind", "check_int_tensor", "check_turn_ids", "check_mask_agrees",
           "check_outcome", "check_turn_rewards", "check_state_ids", "check_packed", "check_tokens_like"]

#: the per-turn credit rules of :func:`creditlib.functional.turn_credit`
KINDS = ("turn-grpo", "turn-index", "anchor-state", "prefix-turn")


def check_kind(kind) -> str:
    """``kind`` must be one of :data:`KINDS`."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_int_tensor(name: str, x, dim: int, what: str) -> torch.Tensor:
    """An integer (not bool, float or complex) tensor with ``dim`` dims, as int64."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be an int64 torch.Tensor {what}, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer (int64) tensor {what}, got dtype {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}, got shape {tuple(x.shape)}")
    return x.to(torch.int64)


def check_turn_ids(turn_ids, name: str = "turn_ids") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The turn ids, checked, and where the turns of each row sit.

    Args:
        turn_ids: integer ``[B, T]``: ``-1`` (not a policy token) or a turn index ``>= 0``,
            non-decreasing along each row's valid tokens (gaps allowed; a turn's tokens need not be
            contiguous).
    Returns:
        ``(ids, n_turns, last)``: int64 ``[B, T]``; int64 ``[B]`` ``K_i = max id + 1`` (0 for a
        row without valid tokens); int64 ``[B, W]`` (``W = max_i K_i``) the position of the last
        token of turn ``k`` of row ``i`` (-1 for a turn without tokens, or ``k >= K_i``).
    Raises:
        ValueError: a value below -1 or ids that decrease along a row (naming the row and positions).

    The rows are read once: the positions where the id changes (``ids[:, t] != ids[:, t - 1]``)
    start the segments of equal ids, a few per turn; everything else is read off the segments.
    """
    ids = check_int_tensor(name, turn_ids, 2, "[B, T] (the turn of each valid token, -1 elsewhere)")  # [B, T]
    B, T = ids.shape
    dev = ids.device
    if B == 0 or T == 0:
        return ids, torch.zeros(B, dtype=torch.int64, device=dev), torch.full((B, 0), -1, dtype=torch.int64,
                                                                              device=dev)
    chg = torch.ones(B, T, dtype=torch.bool, device=dev)  # [B, T] a segment of equal ids starts here
    torch.ne(ids[:, 1:], ids[:, :-1], out=chg[:, 1:])
    rs, ts = chg.nonzero(as_tuple=True)  # [S] each, row-major
    sid = ids[rs, ts]  # [S] each segment's id
    if int(sid.min()) < -1:
        j = int((sid < -1).nonzero()[0, 0])
        b, t = int(rs[j]), int(ts[j])
        raise ValueError(f"{name} must be -1 (not a policy token) or a turn index >= 0: row {b}, position {t} "
                         f"holds {int(ids[b, t])}")
    same = torch.zeros_like(rs, dtype=torch.bool)  # [S] the next segment is in the same row
    same[:-1] = rs[1:] == rs[:-1]
    end = torch.full_like(ts, T - 1)  # [S] each segment's last position
    end[:-1] = torch.where(same[:-1], ts[1:] - 1, end[:-1])
    keep = sid >= 0
    rs, ts, end, sid = rs[keep], ts[keep], end[keep], sid[keep]  # [S'] the segments of valid tokens
    if rs.numel() > 1:
        bad = (rs[1:] == rs[:-1]) & (sid[1:] < sid[:-1])  # [S' - 1] a later segment of a row with a smaller id
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            b = int(rs[j])
            raise ValueError(f"{name} must be non-decreasing along the valid tokens of each row: row {b} has turn "
                             f"{int(sid[j + 1])} at position {int(ts[j + 1])} after turn {int(sid[j])} at position "
                             f"{int(end[j])}")
    W = int(sid.max()) + 1 if sid.numel() else 0
    last = torch.full((B * W,), -1, dtype=torch.int64, device=dev)  # [B W]
    last.scatter_reduce_(0, rs * W + sid, end, "amax")
    last = last.view(B, W)  # [B, W]
    n_turns = torch.zeros(B, dtype=torch.int64, device=dev).scatter_reduce_(0, rs, sid + 1, "amax")  # [B]
    return ids, n_turns, last


def check_mask_agrees(ids: torch.Tensor, mask, name: str = "mask") -> torch.Tensor:
    """``mask`` (bool or integer, nonzero = valid) ``[B, T]`` must be True exactly where
    ``turn_ids >= 0``. Returns the bool mask."""
    mask = as_bool_mask(mask, name)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal turn_ids shape {tuple(ids.shape)}")
    if mask.device != ids.device:
        raise ValueError(f"{name} is on {mask.device} but turn_ids is on {ids.device}")
    diff = mask != (ids >= 0)  # [B, T]
    if bool(diff.any()):
        b, t = diff.nonzero()[0].tolist()
        raise ValueError(f"turn_ids and {name} disagree at row {b}, position {t}: turn_ids = {int(ids[b, t])} but "
                         f"{name} is {bool(mask[b, t])} (turn_ids >= 0 exactly where {name} is True)")
    return mask


def check_outcome(rewards, B: int, device: torch.device, name: str = "rewards") -> Optional[torch.Tensor]:
    """Float ``[B]`` outcome rewards, finite (``None`` passes through)."""
    if rewards is None:
        return None
    rewards = check_float(name, rewards)
    if rewards.shape != (B,):
        raise ValueError(f"{name} must be 1-D [B] with B = {B} (the rows of turn_ids), got shape "
                         f"{tuple(rewards.shape)}")
    if rewards.device != device:
        raise ValueError(f"{name} is on {rewards.device} but turn_ids is on {device}")
    bad = ~torch.isfinite(rewards.detach())  # [B]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite: row {i} has {name}[{i}] = {float(rewards[i])}; mark failed "
                         f"rewards as wrong (e.g. 0) instead")
    return rewards.detach()


def check_turn_rewards(turn_rewards, B: int, n_turns: Optional[torch.Tensor], device: torch.device,
                       name: str = "turn_rewards") -> Optional[torch.Tensor]:
    """Float ``[B, K]`` per-turn rewards, finite, with ``K >= max_i K_i`` and nothing at ``k >= K_i``
    (``n_turns`` int64 ``[B]``; ``None`` skips the turn checks). ``None`` passes through."""
    if turn_rewards is None:
        return None
    tr = check_float(name, turn_rewards)
    if tr.dim() != 2 or tr.shape[0] != B:
        raise ValueError(f"{name} must be 2-D [B, K] with B = {B} (one column per turn), got shape {tuple(tr.shape)}")
    if tr.device != device:
        raise ValueError(f"{name} is on {tr.device} but turn_ids is on {device}")
    tr = tr.detach()
    bad = ~torch.isfinite(tr)  # [B, K]
    if bool(bad.any()):
        i, k = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite: row {i}, turn {k} holds {float(tr[i, k])}")
    if n_turns is not None:
        K = tr.shape[1]
        kmax = int(n_turns.max()) if n_turns.numel() else 0
        if K < kmax:
            i = int((n_turns > K).nonzero()[0, 0])
            raise ValueError(f"{name} must have K >= max_i K_i = {kmax} columns (row {i} has {int(n_turns[i])} "
                             f"turns), got shape {tuple(tr.shape)}")
        beyond = (torch.arange(K, device=device)[None, :] >= n_turns[:, None]) & (tr != 0)  # [B, K]
        if bool(beyond.any()):
            i, k = beyond.nonzero()[0].tolist()
            raise ValueError(f"{name}[{i}, {k}] = {float(tr[i, k])}: rewards for turns row {i} does not have "
                             f"(row {i} has K_{i} = {int(n_turns[i])} turns)")
    return tr


def check_state_ids(state_ids, B: int, n_turns: torch.Tensor, K_same: Optional[int], device: torch.device,
                    name: str = "state_ids") -> torch.Tensor:
    """int64 ``[B, K]`` state ids (``-1`` unknown): ``K = K_same`` (the width of ``turn_rewards``)
    when given, else ``K >= max_i K_i``; values ``>= -1``."""
    what = "[B, K] (the id of the state before each turn, -1 unknown)"
    s = check_int_tensor(name, state_ids, 2, what)  # [B, K]
    if s.shape[0] != B:
        raise ValueError(f"{name} must be {what} with B = {B}, got shape {tuple(s.shape)}")
    K = s.shape[1]
    kmax = int(n_turns.max()) if n_turns.numel() else 0
    if K_same is not None and K != K_same:
        raise ValueError(f"{name} must have the width of turn_rewards, K = {K_same}, got shape {tuple(s.shape)}")
    if K < kmax:
        raise ValueError(f"{name} must have K >= max_i K_i = {kmax} columns, got shape {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but turn_ids is on {device}")
    if s.numel() and int(s.amin()) < -1:
        i, k = (s < -1).nonzero()[0].tolist()
        raise ValueError(f"{name} must be -1 (unknown) or a state id >= 0: row {i}, turn {k} holds {int(s[i, k])}")
    return s


def check_packed(cu_seqlens, N: int, device: torch.device) -> torch.Tensor:
    """int64 ``[B + 1]`` offsets: ``0 = cu[0] <= cu[1] <= ... <= cu[B] = N``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be an int64 torch.Tensor [B + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [B + 1], got {cu_seqlens.dtype} of shape "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)  # [B + 1]
    if int(cu[0]) != 0 or int(cu[-1]) != N:
        raise ValueError(f"cu_seqlens must start at 0 and end at N = {N} (the packed tokens), got "
                         f"{int(cu[0])} .. {int(cu[-1])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        i = int((cu[1:] < cu[:-1]).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{i + 1}] = {int(cu[i + 1])} < "
                         f"cu_seqlens[{i}] = {int(cu[i])}")
    return cu


def check_tokens_like(tokens, ids: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    """Integer token ids with the shape and device of ``turn_ids``."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
            or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids with the shape of turn_ids "
                         f"{tuple(ids.shape)}, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.shape != ids.shape:
        raise ValueError(f"{name} shape {tuple(tokens.shape)} must equal turn_ids shape {tuple(ids.shape)}")
    if tokens.device != ids.device:
        raise ValueError(f"{name} is on {tokens.device} but turn_ids is on {ids.device}")
    return tokens
