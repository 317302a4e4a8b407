"""Turn and step credit for agents: the vectorised form (behind ``creditlib.functional``).

    ids = turn_ids_from_mask(mask)                       # int64 [B, T]: turn k of each valid token, -1 elsewhere
    G = turn_returns(ids, turn_rewards, rewards, gamma=0.9)            # [B, K] discounted turn returns
    adv = turn_credit("turn-index", ids, turn_rewards, rewards, 8)     # [B, T] per-token advantages
    A = turn_credit("anchor-state", ids, rewards=r, group_size=8, state_ids=s, per_turn=True)   # [B, K]

A trajectory is one row; its policy tokens are the valid ones, its turns the runs of them (or
the ids the caller gives). ``r_{i,k} = turn_rewards[i, k] + [k = K_i - 1] rewards[i]`` and the
return of turn ``k`` is ``G_{i,k} = sum_{k' >= k} gamma^(k' - k) r_{i,k'}`` (a row with no turn
has ``G_{i,0} = rewards[i]``: it still counts in episode baselines). Every rule is leave-one-out:
a trajectory's own returns never enter its own baseline. ``s`` is the unbiased std of the stated
set plus ``eps`` (``scale="std"``) or 1 (``"none"``); a zero ``s`` gives 0, never NaN.

* ``turn-grpo``: ``A_{i,k} = (G_{i,0} - mean_{j != i} G_{j,0}) / s`` (the group's RLOO advantage of
  the episode return, on every turn).
* ``turn-index`` (MT-GRPO's grouping): the baseline of turn ``k`` is the mean of ``G_{j,k}`` over
  the other trajectories of the group that reached turn ``k`` (``K_j > k``), ``s_k`` the std over
  all that reached it. Biased where reaching turn ``k`` depends on the policy.
* ``anchor-state`` (GiGPO, arXiv 2505.10978): ``A_{i,k} = A^E_i + omega A^S_{i,k}``: ``A^E`` is
  turn-grpo's, ``A^S_{i,k} = (G_{i,k} - mean_S G) / s_u`` with ``S`` every turn of every *other*
  trajectory of the group that started from the same state ``u = state_ids[i, k]`` (``-1`` or an
  empty ``S``: 0), ``s_u`` the std over every turn of the group from ``u``, own turns included.
* ``prefix-turn``: the step-level prefix-tree TD error (:func:`creditlib.functional.prefix_td`
  with ``boundary`` at each turn's last token, rewards ``R_i = G_{i,0}`` with ``gamma = 1``),
  summed per turn (``D_{i,k} = V_i(start of turn k + 1) - V_i(start of turn k)``, or ``R_i -
  V_i(start)`` for the last turn, over ``s``; computed as the token-level TD error summed over the
  turn, which telescopes to the same), then GAE over turns: ``A_{i,k} = sum_{k' >= k} (gae_gamma
  gae_lam)^(k' - k) D_{i,k'}``; at ``gae_gamma = gae_lam = 1`` that is ``(R_i - V_i(start of turn
  k)) / s``.

Every token of turn ``k`` gets ``A[i, k]``; masked tokens get 0 (SkyRL#1492).

How it is computed (no Python loop over tokens, rows or groups): the turn ids are read once (the
positions where the id changes start segments of equal ids, a few per turn: the order check, the
number of turns and each turn's last token come off those), the returns are a
discounted suffix sum over the ``K`` turn columns (a cumsum for ``gamma = 1``; ``[128, 128]``
triangular matmuls otherwise, one per block of 128 turns), the baselines segment sums
(``index_add_``) over the ``B K`` turn entries keyed by (group, turn) or (group, state), and the
per-token result one ``gather`` from ``[B, K]``. Memory ``O(B T)`` for a few int64 temporaries.
The plain loops these are tested against are in :mod:`creditlib.ops.turns.naive`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._validation import as_bool_mask, check_eps, check_float, check_scale, check_unit, is_real
from ..prefix.vectorised import _canonical, _validate_groups, prefix_td
from ._check import (KINDS, check_int_tensor, check_kind, check_mask_agrees, check_outcome, check_packed,
                     check_state_ids, check_tokens_like, check_turn_ids, check_turn_rewards)

__all__ = ["KINDS", "turn_ids_from_mask", "turn_ends", "turn_returns", "turn_credit", "implicit_process_rewards"]

_BLOCK = 128  # turn columns per triangular block of the discounted suffix sum


# ----------------------------------------------------------------------------- pieces
def _ends_from_last(last: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """bool ``[B, T]``: True at each ``last[b, k] >= 0`` (int64 ``[B, W]``)."""
    flat = torch.zeros(B * T + 1, dtype=torch.bool, device=last.device)  # [B T + 1], the last entry a sink
    base = torch.arange(B, device=last.device)[:, None] * T  # [B, 1]
    idx = torch.where(last >= 0, base + last, torch.full_like(last, B * T))  # [B, W]
    flat[idx.reshape(-1)] = True
    return flat[: B * T].view(B, T)


def _suffix_sum(x: torch.Tensor, d: float) -> torch.Tensor:
    """``out[:, k] = sum_{k' >= k} d^(k' - k) x[:, k']`` for float64 ``[B, K]``."""
    B, K = x.shape
    if K == 0 or d == 1.0:
        return x.flip(1).cumsum(1).flip(1)  # [B, K]
    if d == 0.0:
        return x.clone()
    out = torch.empty_like(x)  # [B, K]
    carry = torch.zeros(B, dtype=x.dtype, device=x.device)  # [B] out[:, e] of the block after
    for e in range(K, 0, -_BLOCK):  # blocks [s, e), the last first: ceil(K / 128) steps
        s = max(0, e - _BLOCK)
        k = torch.arange(e - s, device=x.device, dtype=x.dtype)  # [c]
        expo = k[:, None] - k[None, :]  # [c, c] k' - k
        tri = torch.where(expo >= 0, torch.pow(d, expo.clamp_min(0)), torch.zeros_like(expo))  # [c, c]
        out[:, s:e] = x[:, s:e] @ tri + carry[:, None] * torch.pow(d, (e - s) - k)  # [B, c]
        carry = out[:, s]
    return out


def _group_index(B: int, group_size, group_ids, device: torch.device) -> Tuple[torch.Tensor, int]:
    """int64 ``[B]`` group of each row in ``0 .. n - 1``, and ``n``."""
    G = _validate_groups(B, group_size, group_ids)
    if group_ids is None:
        return torch.arange(B, device=device) // G, B // G  # [B]
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), 0
    gid = torch.unique(group_ids.to(device), return_inverse=True)[1]  # [B]
    return gid, int(gid.max()) + 1


def _seg_stats(key: torch.Tensor, val: torch.Tensor, n: int):
    """Counts, sums and unbiased stds (0 below two members) of float64 ``val`` ``[E]`` by ``key``
    ``[E]`` in ``0 .. n - 1``: float64 ``[n]`` each (two passes: the std from deviations)."""
    cnt = torch.zeros(n, dtype=val.dtype, device=val.device).index_add_(0, key, torch.ones_like(val))  # [n]
    tot = torch.zeros(n, dtype=val.dtype, device=val.device).index_add_(0, key, val)  # [n]
    mean = tot / cnt.clamp_min(1)  # [n]
    sq = torch.zeros(n, dtype=val.dtype, device=val.device).index_add_(0, key, (val - mean[key]) ** 2)  # [n]
    std = torch.where(cnt > 1, (sq / (cnt - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))  # [n]
    return cnt, tot, std


def _loo(val: torch.Tensor, others: torch.Tensor, others_sum: torch.Tensor, std: torch.Tensor, scale: str,
         eps: float) -> torch.Tensor:
    """``(val - others_sum / others) / s`` where ``others > 0``, else 0 (float64 ``[E]`` each)."""
    adv = torch.where(others > 0, val - others_sum / others.clamp_min(1), torch.zeros_like(val))  # [E]
    if scale == "none":
        return adv
    den = std + eps  # [E]
    return torch.where(den > 0, adv / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(adv))


def _out_dtype(*xs) -> torch.dtype:
    dt = None
    for x in xs:
        if x is not None:
            dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    return torch.get_default_dtype() if dt is None else dt


def _unpack_index(cu: torch.Tensor, N: int):
    """``(B, T_max, row, col)``: packed token ``n`` sits at ``[row[n], col[n]]`` of the padded
    ``[B, T_max]`` (int64 ``[N]`` each)."""
    B = cu.numel() - 1
    lens = cu[1:] - cu[:-1]  # [B]
    Tm = int(lens.max()) if B else 0
    row = torch.repeat_interleave(torch.arange(B, device=cu.device), lens)  # [N]
    col = torch.arange(N, device=cu.device) - cu[row]  # [N]
    return B, Tm, row, col


def _pad(x: torch.Tensor, B: int, Tm: int, row: torch.Tensor, col: torch.Tensor, fill) -> torch.Tensor:
    out = torch.full((B, Tm), fill, dtype=x.dtype, device=x.device)  # [B, T_max]
    out[row, col] = x
    return out


def _packed_inputs(turn_ids, mask, tokens, cu_seqlens):
    """The packed form (``[N]`` inputs, ``cu_seqlens`` ``[B + 1]``) as padded ``[B, T_max]`` (turn id
    -1, mask False, token 0 at the padding), and the index to read the result back."""
    ref = next((x for x in (turn_ids, mask, tokens) if isinstance(x, torch.Tensor)), None)
    if ref is None:
        raise ValueError("give turn_ids (int64 [N] in the packed form) or mask")
    for name, x in (("turn_ids", turn_ids), ("mask", mask), ("tokens", tokens)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape != ref.shape):
            raise ValueError(f"{name} must be 1-D packed [N] (N = {ref.shape[0] if ref.dim() else 0}) with "
                             f"cu_seqlens, got shape {tuple(getattr(x, 'shape', ()))}")
    N = ref.shape[0]
    cu = check_packed(cu_seqlens, N, ref.device)
    B, Tm, row, col = _unpack_index(cu, N)
    if turn_ids is not None:
        turn_ids = _pad(check_int_tensor("turn_ids", turn_ids, 1, "[N] (packed)"), B, Tm, row, col, -1)
    if mask is not None:
        mask = _pad(as_bool_mask(mask), B, Tm, row, col, False)
    if tokens is not None:
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}")
        tokens = _pad(tokens, B, Tm, row, col, 0)
    return turn_ids, mask, tokens, (row, col)


def _returns64(n_turns: torch.Tensor, tr: Optional[torch.Tensor], rewards: Optional[torch.Tensor], B: int, W: int,
               gamma: float, device: torch.device) -> torch.Tensor:
    """float64 ``[B, W]`` ``G_{i,k}`` (validated inputs; ``tr`` at most ``W`` columns)."""
    r = torch.zeros(B, W, dtype=torch.float64, device=device)  # [B, W] r_{i,k}
    if tr is not None and tr.shape[1]:
        r[:, : tr.shape[1]] = tr
    if rewards is not None and W:
        r.scatter_add_(1, (n_turns - 1).clamp_min(0)[:, None], rewards.to(torch.float64)[:, None])  # the last turn
    return _suffix_sum(r, gamma)  # [B, W]


def _turn_inputs(turn_ids, mask, cu_seqlens, tokens=None):
    """Validated ``(ids [B, T], mask [B, T] or None, tokens or None, unpack or None, n_turns [B], last [B, W])``."""
    unpack = None
    if cu_seqlens is not None:
        turn_ids, mask, tokens, unpack = _packed_inputs(turn_ids, mask, tokens, cu_seqlens)
    derived = turn_ids is None
    if derived:
        if mask is None:
            raise ValueError("give turn_ids (int64 [B, T]: the turn of each valid token, -1 elsewhere) or mask")
        turn_ids = turn_ids_from_mask(mask)
    ids, n_turns, last = check_turn_ids(turn_ids)  # [B, T], [B], [B, W]
    if mask is not None:
        mask = as_bool_mask(mask) if derived else check_mask_agrees(ids, mask)  # [B, T]
    if tokens is not None:
        tokens = check_tokens_like(tokens, ids)
    return ids, mask, tokens, unpack, n_turns, last


# ----------------------------------------------------------------------------- public API
def turn_ids_from_mask(mask: torch.Tensor, boundary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The turn of each valid token: each maximal run of valid tokens is one turn.

    Args:
        mask: bool or integer ``[B, T]`` (nonzero = a policy token; observations, tool output and
            padding masked).
        boundary: optional bool or integer ``[B, T]``, True where a token ends a step: a new turn
            also starts after every valid boundary token (the steps of a single-turn completion;
            flags at masked positions are ignored).
    Returns:
        int64 ``[B, T]``: ``0, 1, ...`` in order along each row's valid tokens, -1 where masked.
    """
    mask = as_bool_mask(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [B, T], got shape {tuple(mask.shape)}")
    mask = _canonical(mask)  # bytes 0 / 1 (a uint8 tensor viewed as bool may hold others)
    B, T = mask.shape
    if boundary is not None:
        boundary = as_bool_mask(boundary, "boundary")
        if boundary.shape != mask.shape:
            raise ValueError(f"boundary shape {tuple(boundary.shape)} must equal mask shape {tuple(mask.shape)}")
        boundary = _canonical(boundary.to(mask.device))  # [B, T]
    start = mask.clone()  # [B, T] a turn starts here
    if T > 1:
        cont = mask[:, :-1]  # [B, T - 1] the previous token is valid ...
        if boundary is not None:
            cont = cont & ~boundary[:, :-1]  # ... and does not end a step
        start[:, 1:] &= ~cont
    # turns started so far, as int32 (a bool -> int64 cumsum is several times slower on CPU), times the
    # mask, minus 1 into the int64 result: the turn at valid tokens, -1 elsewhere
    count = torch.cumsum(start.view(torch.uint8), 1, dtype=torch.int32).mul_(mask)  # [B, T]
    return torch.sub(count, 1, out=torch.empty(B, T, dtype=torch.int64, device=mask.device))  # [B, T]


def turn_ends(turn_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, T]``: True at the last valid token of each turn (the ``boundary`` of the
    step-level :func:`creditlib.functional.prefix_td` that makes each turn one step).

    ``turn_ids``: int64 ``[B, T]``, the turn of each valid token (-1 elsewhere), non-decreasing
    along each row's valid tokens (a turn's tokens need not be contiguous: its last one counts).
    """
    ids, _, last = check_turn_ids(turn_ids)  # [B, T], [B], [B, W]
    return _ends_from_last(last, *ids.shape)


def turn_returns(turn_ids: Optional[torch.Tensor], turn_rewards: Optional[torch.Tensor] = None,
                 rewards: Optional[torch.Tensor] = None, *, gamma: float = 1.0,
                 cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Discounted return of every turn: ``G_{i,k} = sum_{k'=k}^{K_i - 1} gamma^(k' - k) r_{i,k'}``.

    ``r_{i,k} = turn_rewards[i, k] + [k = K_i - 1] rewards[i]`` (the outcome reward is paid after
    the last turn); ``K_i`` is row ``i``'s largest turn id + 1.

    Args:
        turn_ids: int64 ``[B, T]`` (or packed ``[N]`` with ``cu_seqlens``): the turn of each valid
            token, -1 elsewhere; non-decreasing along each row (gaps allowed).
        turn_rewards: float ``[B, K]``, ``K >= max_i K_i``, finite, 0 at ``k >= K_i``; ``None`` = 0.
        rewards: float ``[B]`` outcome rewards, finite; ``None`` = 0.
        gamma: the discount over turns, in ``[0, 1]``.
        cu_seqlens: int64 ``[B + 1]`` row offsets of the packed form.
    Returns:
        ``[B, max(K, 1)]`` (``K``: the width of ``turn_rewards``, else ``max_i K_i``), dtype of the
        rewards (``turn_rewards`` and ``rewards`` promoted; the default dtype when neither), 0 at
        ``k >= K_i``, except that a row without turns has ``G_{i,0} = rewards[i]``.
    """
    gamma = check_unit("gamma", gamma)
    ids, _, _, _, n_turns, last = _turn_inputs(turn_ids, None, cu_seqlens)
    B = ids.shape[0]
    rewards = check_outcome(rewards, B, ids.device)
    tr = check_turn_rewards(turn_rewards, B, n_turns, ids.device)
    K = tr.shape[1] if tr is not None else last.shape[1]
    G = _returns64(n_turns, tr, rewards, B, max(K, 1), gamma, ids.device)  # [B, W]
    return G.to(_out_dtype(turn_rewards, rewards))


def turn_credit(kind: str, turn_ids: Optional[torch.Tensor], turn_rewards: Optional[torch.Tensor] = None,
                rewards: Optional[torch.Tensor] = None, group_size: Optional[int] = None, *,
                group_ids: Optional[torch.Tensor] = None, state_ids: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, gamma: float = 1.0,
                omega: float = 1.0, gae_gamma: float = 1.0, gae_lam: float = 1.0, scale: str = "std",
                eps: float = 1e-4, cu_seqlens: Optional[torch.Tensor] = None, per_turn: bool = False) -> torch.Tensor:
    """Per-turn credit of multi-turn trajectories, broadcast onto each turn's tokens.

    The four rules (module docstring of :mod:`creditlib.ops.turns.vectorised`; all leave-one-out)::

        turn-grpo     A_{i,k} = (G_{i,0} - mean_{j != i} G_{j,0}) / s
        turn-index    A_{i,k} = (G_{i,k} - mean_{j != i, K_j > k} G_{j,k}) / s_k
        anchor-state  A_{i,k} = A^E_i + omega (G_{i,k} - mean of the other trajectories' turns from
                      state_ids[i, k]) / s_u
        prefix-turn   A_{i,k} = sum_{k' >= k} (gae_gamma gae_lam)^(k' - k) D_{i,k'}, D the step-level
                      prefix-tree TD error summed over turn k'

    Args:
        kind: ``"turn-grpo"``, ``"turn-index"``, ``"anchor-state"`` or ``"prefix-turn"``.
        turn_ids: int64 ``[B, T]``: the turn ``k = 0 .. K_i - 1`` of each valid token, -1 elsewhere,
            non-decreasing along each row (gaps allowed); ``None``: ``turn_ids_from_mask(mask)``.
        turn_rewards: float ``[B, K]`` reward after each turn (``K >= max_i K_i``, 0 at ``k >= K_i``);
            ``None`` = 0.
        rewards: float ``[B]`` outcome reward, added to the last turn; ``None`` = 0.
        group_size / group_ids: the groups (exactly one), as in ``group_advantage``.
        state_ids: int64 ``[B, K]`` state before each turn, -1 unknown (``"anchor-state"`` only).
        tokens: integer ``[B, T]`` token ids (``"prefix-turn"`` only).
        mask: bool or integer ``[B, T]``; when given with ``turn_ids`` it must be True exactly where
            ``turn_ids >= 0``.
        gamma: discount over turns in ``[0, 1]`` (``"prefix-turn"``: must be 1).
        omega: weight of the state advantage (``"anchor-state"``), ``>= 0``.
        gae_gamma, gae_lam: GAE over turns (``"prefix-turn"``), in ``[0, 1]``.
        scale: ``"std"`` or ``"none"``; eps: added to the std.
        cu_seqlens: int64 ``[B + 1]``: the packed form, ``turn_ids`` / ``tokens`` / ``mask`` ``[N]``.
        per_turn: return the per-turn ``A`` ``[B, max(K, 1)]`` instead of the per-token result.
    Returns:
        ``[B, T]`` (packed: ``[N]``) per-token advantages, ``A[i, turn_ids[i, t]]`` where
        ``turn_ids >= 0`` and 0 elsewhere; or ``[B, max(K, 1)]`` with ``per_turn`` (0 at
        ``k >= K_i``). Dtype of the rewards (promoted; the default dtype when none is given),
        computed in float64; no gradient (rewards are data).
    Raises:
        ValueError: an unknown kind (listing them), or bad input (naming the argument and the row).
    """
    kind = check_kind(kind)
    gamma = check_unit("gamma", gamma)
    omega = check_eps(omega, "omega")
    gae_gamma, gae_lam = check_unit("gae_gamma", gae_gamma), check_unit("gae_lam", gae_lam)
    scale, eps = check_scale(scale), check_eps(eps)
    if not isinstance(per_turn, bool):
        raise ValueError(f"per_turn must be a bool, got {per_turn!r}")
    if kind == "prefix-turn":
        if gamma != 1.0:
            raise ValueError(f"kind='prefix-turn' needs gamma = 1 (its rewards are the undiscounted totals R_i = "
                             f"G_(i,0); discount over turns with gae_gamma), got gamma={gamma}")
        if tokens is None:
            raise ValueError("kind='prefix-turn' needs tokens: the integer token ids [B, T] (the prefix tree)")
    elif tokens is not None:
        raise ValueError(f"tokens applies to kind='prefix-turn' only, not kind={kind!r} (it would be ignored)")
    if kind == "anchor-state" and state_ids is None:
        raise ValueError("kind='anchor-state' needs state_ids: int64 [B, K], the id of the environment state "
                         "before each turn (-1 unknown)")
    if kind != "anchor-state" and state_ids is not None:
        raise ValueError(f"state_ids applies to kind='anchor-state' only, not kind={kind!r} (it would be ignored)")
    ids, mask, tokens, unpack, n_turns, last = _turn_inputs(turn_ids, mask, cu_seqlens, tokens)
    B, T = ids.shape
    dev = ids.device
    rewards = check_outcome(rewards, B, dev)
    tr = check_turn_rewards(turn_rewards, B, n_turns, dev)
    state = None
    if state_ids is not None:
        state = check_state_ids(state_ids, B, n_turns, None if tr is None else tr.shape[1], dev)  # [B, K]
    K = tr.shape[1] if tr is not None else (state.shape[1] if state is not None else last.shape[1])
    W = max(K, 1)
    out_dtype = _out_dtype(turn_rewards, rewards)
    gid, n = _group_index(B, group_size, group_ids, dev)  # [B]
    with torch.no_grad():
        G = _returns64(n_turns, tr, rewards, B, W, gamma, dev)  # [B, W] float64
        present = torch.arange(W, device=dev)[None, :] < n_turns[:, None]  # [B, W] k < K_i
        if kind == "prefix-turn":
            vmask = ids >= 0 if mask is None else mask  # [B, T]
            # The step-level TD error with a boundary at each turn's last token, summed over turn k,
            # is V(start of turn k + 1) - V(start of turn k) (R_i - V(start) for the last turn). So
            # is the token-level TD error summed over turn k: a turn's valid tokens are one block of
            # the row's valid tokens, whose token deltas telescope. The token-level form is the
            # cheaper one (no step starts to find); the per-turn sums are differences of a cumsum
            # read at the turns' last tokens.
            # (prefix_td works in float64 inside; its [B, T] output is float64 only for float64 rewards)
            cd = torch.float64 if out_dtype == torch.float64 else torch.float32
            delta = prefix_td(tokens, vmask, G[:, 0].to(cd), group_size, group_ids=group_ids, scale=scale,
                              eps=eps)  # [B, T], 0 where masked
            D = torch.zeros(B, W, dtype=torch.float64, device=dev)  # [B, W] TD error summed per turn
            if last.shape[1]:
                upto = last.cummax(1).values  # [B, W'] last token of the turns <= k (-1: none yet)
                S = torch.where(upto >= 0, delta.cumsum(1).gather(1, upto.clamp_min(0)).to(D.dtype),
                                torch.zeros((), dtype=D.dtype, device=dev))  # [B, W'] delta summed over turns <= k
                D[:, : last.shape[1]] = torch.diff(S, dim=1, prepend=torch.zeros(B, 1, dtype=D.dtype, device=dev))
            A = _suffix_sum(D, gae_gamma * gae_lam) * present  # [B, W]
        else:
            G0 = G[:, 0]  # [B] episode returns
            cnt, tot, std = _seg_stats(gid, G0, n)  # [n] each
            aE = _loo(G0, cnt[gid] - 1, tot[gid] - G0, std[gid], scale, eps)  # [B]
            if kind == "turn-index":
                rows, ks = present.nonzero(as_tuple=True)  # [E] each: the turns that exist
                key = gid[rows] * W + ks  # [E] (group, turn)
                val = G[rows, ks]  # [E]
                cnt, tot, std = _seg_stats(key, val, n * W)  # [n W] each
                A = torch.zeros(B, W, dtype=torch.float64, device=dev)  # [B, W]
                A[rows, ks] = _loo(val, cnt[key] - 1, tot[key] - val, std[key], scale, eps)
            else:
                A = aE[:, None] * present  # [B, W] turn-grpo: the episode advantage on every turn
                if kind == "anchor-state":
                    sw = torch.full((B, W), -1, dtype=torch.int64, device=dev)  # [B, W]
                    sw[:, : state.shape[1]] = state[:, :W]
                    rows, ks = (present & (sw >= 0)).nonzero(as_tuple=True)  # [E] each: turns from a known state
                    if rows.numel():
                        u = torch.unique(sw[rows, ks], return_inverse=True)[1]  # [E] state in 0 .. U - 1
                        U = int(u.max()) + 1
                        kg = torch.unique(gid[rows] * U + u, return_inverse=True)[1]  # [E] (group, state)
                        ko = torch.unique(rows * U + u, return_inverse=True)[1]  # [E] (row, state)
                        val = G[rows, ks]  # [E]
                        cnt, tot, std = _seg_stats(kg, val, int(kg.max()) + 1)  # every turn of the group from u
                        ocnt, otot, _ = _seg_stats(ko, val, int(ko.max()) + 1)  # the row's own turns from u
                        aS = _loo(val, cnt[kg] - ocnt[ko], tot[kg] - otot[ko], std[kg], scale, eps)  # [E]
                        A[rows, ks] += omega * aS
    A = A.to(out_dtype)  # [B, W]
    if per_turn:
        return A
    A0 = torch.cat([torch.zeros(B, 1, dtype=out_dtype, device=dev), A], 1)  # [B, W + 1] column 0: masked tokens
    adv = A0.gather(1, ids + 1)  # [B, T] A[i, turn_ids[i, t]], 0 where turn_ids = -1
    if unpack is not None:
        return adv[unpack[0], unpack[1]]  # [N]
    return adv


def implicit_process_rewards(log_ratio: torch.Tensor, turn_ids: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Implicit process rewards (PRIME): ``beta`` times the sum of each step's log-ratios.

    ``r_{i,k} = beta * sum_{t : turn_ids[i, t] = k} log_ratio[i, t]`` with ``log_ratio = log
    pi_prm - log pi_ref`` of an implicit PRM; feed the result to :func:`turn_credit` as
    ``turn_rewards`` (with step ids from ``turn_ids_from_mask(mask, boundary)``).

    Args:
        log_ratio: float ``[B, T]`` (masked entries are ignored, even when NaN).
        turn_ids: int64 ``[B, T]``, -1 where masked; non-decreasing along each row.
        beta: a finite real.
    Returns:
        ``[B, max_i K_i]`` in the dtype of ``log_ratio`` (half types summed in float32);
        differentiable in ``log_ratio``.
    Raises:
        ValueError: a NaN/inf log-ratio at a valid token (naming the row), or bad input.
    """
    ids, _, last = check_turn_ids(turn_ids)  # [B, T], [B], [B, W]
    x = check_float("log_ratio", log_ratio)
    if x.shape != ids.shape:
        raise ValueError(f"log_ratio shape {tuple(x.shape)} must equal turn_ids shape {tuple(ids.shape)}")
    if not is_real(beta):
        raise ValueError(f"beta must be a finite real number, got {beta!r}")
    B, W = last.shape
    valid = ids >= 0  # [B, T]
    bad = valid & ~torch.isfinite(x.detach())  # [B, T]
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(f"log_ratio must be finite at valid tokens: row {b}, position {t} holds {float(x[b, t])}")
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    src = torch.where(valid, x.to(acc), torch.zeros((), dtype=acc, device=x.device))  # [B, T]
    out = torch.zeros(B, W + 1, dtype=acc, device=x.device).scatter_add(1, ids + 1, src)  # [B, W + 1]
    return (out[:, 1:] * float(beta)).to(x.dtype)
