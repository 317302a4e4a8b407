"""The TreeRL global-plus-local credit rule (arXiv 2506.11902) on a group's prefix tree.

With ``o_i`` the valid tokens of row ``i``, ``LCP(i, j)`` the length of the common prefix of ``o_i``
and ``o_j`` (``LCP(i, i) = n_i``), inside one group (docs/design.md, "Tree rollouts"):

* ``U_i(k) = mean{R_j : LCP(i, j) >= k + 1}``: the value of the node after token ``k`` (the leaves,
  ``i`` included, that agree with ``o_i`` through token ``k``);
* ``U_i^par(k)``: the same with ``>= k`` (the node before token ``k``, its parent);
* ``U_root``: the group mean;

valid token ``k`` (0-based, counting valid tokens only) gets

    ``((U_i(k) - U_root) + (U_i(k) - U_i^par(k))) / sqrt(|{j : LCP(i, j) >= k + 1}|)``

(global advantage + local advantage, shrunk by the square root of the leaves below the node).
Groups of one, masked positions and rows without valid tokens get 0. The tree is read from the
tokens, as :func:`creditlib.functional.prefix_td` reads it: rows from :func:`creditlib.rl.tree.
sample_tree` or any group of completions.

How it is computed (no Python loop over tokens or rows): the pairwise common-prefix lengths of each
group (``prefix_td``'s comparison), then, per row, its ``G`` lengths sorted: the number and reward
sum of the members with ``LCP >= m`` are suffix counts / sums read at ``searchsorted(m)``, for every
position ``m`` of the row at once (``[B, T]`` float64). The plain loop is
:func:`creditlib.ops.treerl.naive.treerl_advantage_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import check_eps, check_mask, check_scale
from ..prefix.vectorised import _check_groups, _check_rewards, _check_tokens, _group_scale, _group_tree

__all__ = ["treerl_advantage"]


def treerl_advantage(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                     group_size: Optional[int] = None, *, group_ids: Optional[torch.Tensor] = None,
                     scale: str = "none", eps: float = 1e-4) -> torch.Tensor:
    """TreeRL's per-token advantage ``[B, T]`` (global + local, over ``sqrt`` of the leaves below).

    Args:
        tokens: integer ``[B, T]`` token ids (only valid positions are read).
        mask: bool ``[B, T]``, True = valid completion token (any pattern: left/right padding, runs).
        rewards: float ``[B]``, finite.
        group_size / group_ids: the groups (exactly one), as in ``prefix_td``.
        scale: ``"none"`` (the rule as written) or ``"std"`` (also divided by the group's unbiased
            reward std + ``eps``, as GRPO).
        eps: added to the std for ``scale="std"`` (``>= 0``).
    Returns:
        ``[B, T]`` in the dtype of ``rewards`` (computed in float64), 0 at masked positions, for
        groups of one and rows without valid tokens. Never requires grad.
    """
    tokens = _check_tokens(tokens)
    B, T = tokens.shape
    mask = check_mask(mask, tokens, "tokens")  # bool [B, T] (integer 0/1 masks accepted)
    rewards = _check_rewards(rewards, B, tokens.device)
    scale = check_scale(scale)
    eps = check_eps(eps)
    K, Gm, slots = _check_groups(B, group_size, group_ids, tokens.device)
    dev = tokens.device
    out = torch.zeros(B, T, dtype=rewards.dtype, device=dev)  # [B, T]
    if B == 0 or T == 0 or Gm < 2:
        return out
    with torch.no_grad():
        _, n, lcp, ng, r, valid, rows = _group_tree(tokens, mask, rewards, K, Gm, slots)
        eye = torch.eye(Gm, dtype=torch.bool, device=dev)  # [Gm, Gm]
        lcp = torch.where(eye & valid[:, :, None], ng[:, :, None], lcp)  # [K, Gm, Gm] LCP(i, i) = n_i
        cnt = valid.sum(-1).clamp_min(1).to(torch.float64)  # [K]
        u_root = (r * valid).sum(-1) / cnt  # [K]
        # per slot: the others' common-prefix lengths sorted, rewards in that order, suffix sums
        R = K * Gm
        srt, order = lcp.reshape(R, Gm).sort(-1)  # [R, Gm] ascending (-1: not a member, first)
        member = (srt >= 0).to(torch.float64)  # [R, Gm]
        rr = r.repeat_interleave(Gm, 0).gather(1, order) * member  # [R, Gm]
        zero = torch.zeros(R, 1, dtype=torch.float64, device=dev)
        suf_sum = torch.cat([rr.flip(-1).cumsum(-1).flip(-1), zero], -1)  # [R, Gm + 1]
        suf_cnt = torch.cat([member.flip(-1).cumsum(-1).flip(-1), zero], -1)  # [R, Gm + 1]
        Tc = int(n.max()) if B else 0
        m = torch.arange(Tc + 1, device=dev, dtype=srt.dtype).expand(R, Tc + 1).contiguous()  # [R, Tc + 1]
        at = torch.searchsorted(srt.contiguous(), m)  # [R, Tc + 1] first member with LCP >= m
        N = suf_cnt.gather(1, at)  # [R, Tc + 1] members with LCP >= m
        S = suf_sum.gather(1, at)  # [R, Tc + 1]
        U = S / N.clamp_min(1)  # [R, Tc + 1] U(m - 1) at column m, U^par(m) at column m
        u_node, u_par, n_node = U[:, 1:], U[:, :-1], N[:, 1:]  # [R, Tc] each, column k = token k
        adv = (2 * u_node - u_root.repeat_interleave(Gm)[:, None] - u_par) / n_node.clamp_min(1).sqrt()  # [R, Tc]
        if scale == "std":
            s = _group_scale(r, valid, "std", float(eps))  # [K]
            adv = adv / s.repeat_interleave(Gm)[:, None]
        alone = (valid.sum(-1) < 2).repeat_interleave(Gm)  # [R] groups of one
        adv = adv.masked_fill(alone[:, None], 0.0)
        # slot -> row; valid positions of a row are its compact positions 0 .. n - 1 in order
        per_row = torch.zeros(B, Tc, dtype=torch.float64, device=dev)  # [B, Tc]
        vflat = valid.reshape(-1)  # [R]
        per_row[rows.reshape(-1)[vflat]] = adv[vflat]
        inside = torch.arange(Tc, device=dev)[None, :] < n[:, None]  # [B, Tc]
        out[mask] = per_row[inside].to(out.dtype)
        return out
