"""Group prefix-tree TD error (leave-one-out): the vectorised form.

    delta = prefix_td(tokens, mask, rewards, group_size)          # [B, T], dtype of rewards
    delta = prefix_td(tokens, mask, rewards, group_ids=ids, boundary=newline)   # step-level

The plain definition (a dict-based trie walk) is in :mod:`creditlib.ops.prefix.naive`; the tests
hold this against it. ``entropy_mask`` is in :mod:`creditlib.ops.entropy`.

How ``prefix_td`` is computed (no Python loop over tokens, rows or groups; one loop over the
``G - 1`` pair offsets inside a group). ``B`` rows, ``K`` groups of ``G``:

1. Valid tokens are compacted to the left of each row: nothing to do for right padding; one
   strided window per row for a single run (left padding); a running count and one scatter for
   several runs per row.
2. Common-prefix lengths of every pair of one group: the ``G - 1`` shifted comparisons
   ``c[:, :-s] != c[:, s:]`` are written into one bool ``[K, G (G - 1) / 2, W]`` buffer (several
   of at most ``_NE_BUDGET`` bytes for large groups); read as
   int64 words (8 positions per word), the first nonzero word and its lowest set bit give each
   pair's first mismatch, which is clamped to both lengths. ``O(B G T)`` byte compares.
3. ``V_i`` is a step function of ``k`` with at most ``G - 1`` steps, so the TD error is sparse:
   at most ``G`` nonzero positions per row, at ``k = LCP(i, j)`` where a completion ``j`` leaves
   ``o_i`` (the change of the leave-one-out mean) and at ``n_i - 1`` (the completion's own
   reward against the value of its last shared prefix). Each slot's common-prefix lengths are
   sorted once; the counts and reward sums of the members sharing a prefix are suffix sums read
   by ``searchsorted`` (float64, ``[K, G, G]``: memory ``O(B G + B T)``, never ``G^3``), written
   once each into a zero ``[B, T]`` output.

The step-level variant (``boundary``) reads ``V_i`` only at the step starts (a count against each
row's sorted common-prefix lengths) and writes one TD error per step, on its last token.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ..._validation import as_bool_mask, check_eps, check_float, check_groups, check_mask, check_scale

__all__ = ["prefix_td"]

# largest pair-comparison buffer prefix_td allocates at once (bytes); larger groups take several
_NE_BUDGET = 1 << 26


# ----------------------------------------------------------------------------- validation
def _check_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be an integer torch.Tensor [B, T], got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor (token ids) [B, T], got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D [B, T], got shape {tuple(tokens.shape)}")
    return tokens


def _check_rewards(rewards, B: int, device: torch.device) -> torch.Tensor:
    """Float ``[B]`` on ``device`` and finite (reads the data)."""
    rewards = _check_rewards_shape(rewards, B, device)
    _check_finite_rewards(rewards.detach())
    return rewards


def _check_rewards_shape(rewards, B: int, device: torch.device) -> torch.Tensor:
    """Float ``[B]`` on ``device`` (static checks only: nothing is read)."""
    rewards = check_float("rewards", rewards)
    if rewards.shape != (B,):
        raise ValueError(f"rewards must be 1-D [B] with B = {B} (the rows of tokens), got shape {tuple(rewards.shape)}")
    if rewards.device != device:
        raise ValueError(f"rewards is on {rewards.device} but tokens is on {device}")
    return rewards


def _check_finite_rewards(rewards: torch.Tensor) -> None:
    bad = ~torch.isfinite(rewards)  # [B]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"rewards must be finite: rewards[{i}] = {float(rewards[i])}")


def _validate_groups(B: int, group_size, group_ids) -> Optional[int]:
    """The static checks of the groups (shapes and types; no data read)."""
    G = check_groups(group_size, group_ids)
    if group_ids is None:
        if B % G != 0:
            raise ValueError(f"group_size={G} must divide the batch size B = {B}")
        return G
    if (not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.is_complex()
            or group_ids.dtype == torch.bool or group_ids.shape != (B,)):
        raise ValueError(f"group_ids must be an integer tensor of shape ({B},), got "
                         f"{getattr(group_ids, 'dtype', type(group_ids).__name__)} "
                         f"{tuple(getattr(group_ids, 'shape', ()))}")
    return None


def _check_groups(B: int, group_size, group_ids, device: torch.device):
    """-> (K, Gm, slots): ``slots`` None (group_size: row ``k*G + g`` is slot ``(k, g)``) or an
    int64 ``[K, Gm]`` of row indices, -1 for empty slots of smaller groups."""
    return _group_slots(B, _validate_groups(B, group_size, group_ids), group_ids, device)


def _group_slots(B: int, group_size: Optional[int], group_ids: Optional[torch.Tensor], device: torch.device):
    """:func:`_check_groups` on validated groups."""
    if group_ids is None:
        return B // group_size, group_size, None
    if B == 0:
        return 0, 1, torch.zeros(0, 1, dtype=torch.int64, device=device)
    gid = torch.unique(group_ids.to(device), return_inverse=True)[1]  # [B] in 0..K-1
    K = int(gid.max()) + 1
    counts = torch.bincount(gid, minlength=K)  # [K]
    Gm = int(counts.max())
    order = torch.argsort(gid, stable=True)  # [B] rows grouped, in their original order
    starts = torch.cumsum(counts, 0) - counts  # [K]
    gs = gid[order]  # [B]
    slot = torch.arange(B, device=device) - starts[gs]  # [B]
    slots = torch.full((K, Gm), -1, dtype=torch.int64, device=device)  # [K, Gm]
    slots[gs, slot] = order
    return K, Gm, slots


def _check_boundary(boundary, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    if boundary is None:
        return None
    boundary = as_bool_mask(boundary, "boundary")  # bool or integer 0/1 (nonzero = the token ends a step)
    if boundary.shape != tokens.shape:
        raise ValueError(f"boundary shape {tuple(boundary.shape)} must equal tokens shape {tuple(tokens.shape)}")
    if boundary.device != tokens.device:
        raise ValueError(f"boundary is on {boundary.device} but tokens is on {tokens.device}")
    return boundary


# ----------------------------------------------------------------------------- pieces
def _canonical(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous bool mask whose bytes are 0 or 1 (a uint8 tensor viewed as bool may hold other
    nonzero bytes; any nonzero byte counts as valid). Copies only when it must."""
    m8 = mask.contiguous().view(torch.uint8)
    if m8.numel() and int(m8.amax()) > 1:
        return m8.ne(0)
    return m8.view(torch.bool)


def _row_count(m8: torch.Tensor) -> torch.Tensor:
    """Number of ones in each row of a 0/1 uint8 ``[B, T]``: int64 ``[B]``. Summed as float (exact
    below 2**24 per row; float64 beyond): an integer sum first widens every byte to int64."""
    acc = torch.float32 if m8.shape[1] < (1 << 24) else torch.float64
    return m8.to(acc).sum(1).to(torch.int64)


class _Layout:
    """Where the valid tokens of each row sit. ``n``: int64 ``[B]`` valid counts; ``kind``:
    ``"right"`` (valid tokens start at column 0, no gaps: compact already), ``"run"`` (one run per
    row starting at column ``first[i]``, e.g. left padding), ``"multi"`` (several runs: ``dest``
    int64 ``[B, T]``: where each entry goes in a ``[B, W + 1]`` buffer, its compact position for a
    valid entry and the sink column ``W`` for a masked one; ``g`` int64 ``[B, T]``: the running
    count of valid tokens plus ``i (W + 1)``, non-decreasing over the flattened batch).
    ``width``: the compact width ``W``, ``T`` rounded up to a multiple of 8."""

    __slots__ = ("n", "kind", "first", "dest", "g", "mask", "width")

    def __init__(self, mask: torch.Tensor):
        B, T = mask.shape
        self.mask = mask
        m8 = mask.contiguous().view(torch.uint8)  # [B, T]
        self.n = _row_count(m8)  # [B] int64
        self.first = self.dest = self.g = None
        self.width = W = -(-T // 8) * 8
        if T < 2:
            self.kind = "right"
            return
        rises = (m8[:, 1:] > m8[:, :-1]).view(torch.uint8)  # [B, T - 1] a run starts at t + 1
        if not bool(rises.amax()):
            self.kind = "right"
            return
        if int((_row_count(rises) + m8[:, 0]).amax()) <= 1:
            self.kind = "run"
            mp = m8 if W == T else torch.nn.functional.pad(m8, (0, W - T))  # [B, W]
            self.first = _first_mismatch(mp.view(torch.bool)).clamp_max(T - 1)  # [B] first valid column
            return
        self.kind = "multi"
        S = W + 1  # row stride of the compaction buffer: W compact positions and a sink
        base = torch.arange(B, device=mask.device)[:, None] * S  # [B, 1]
        self.g = torch.cumsum(m8, 1).add_(base)  # [B, T] i S + valid tokens up to and including t
        sink = base + W  # [B, 1]
        self.dest = torch.sub(self.g, sink + 1).mul_(m8).add_(sink).view(-1)  # [B * T] valid: i S + pos

    def compact(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The valid entries of each row moved to its left end: ``[B, width]`` (``width >= T``);
        entries past ``n_i`` are unspecified (never read: common prefixes are clamped to the
        lengths, step values to ``n_i``)."""
        B, T = x.shape
        if self.kind == "right":
            if width == T:
                return x.contiguous()
            return torch.nn.functional.pad(x, (0, width - T)) if x.dtype != torch.bool else \
                torch.nn.functional.pad(x.view(torch.uint8), (0, width - T)).view(torch.bool)
        if self.kind == "run":
            if width == T and B > 1 and x.dtype != torch.bool:
                # row i is the window [i T + first_i, i T + first_i + T) of the flat batch (it may run
                # into row i + 1: those entries are past n_i); the last row's window is padded
                out = torch.empty(B, T, dtype=x.dtype, device=x.device)  # [B, T]
                windows = x.contiguous().view(-1).unfold(0, T, 1)  # [(B - 1) T + 1, T] view, no copy
                starts = torch.arange(B - 1, device=x.device) * T + self.first[:-1]  # [B - 1]
                torch.index_select(windows, 0, starts, out=out[:-1])
                out[-1] = torch.nn.functional.pad(x[-1], (0, T)).narrow(0, int(self.first[-1]), T)
                return out
            idx = (self.first[:, None] + torch.arange(width, device=x.device)).clamp_max_(T - 1)  # [B, width]
            return x.gather(1, idx)
        if width != self.width:
            raise RuntimeError(f"internal: compact width {width} != {self.width}")
        out = x.new_zeros(B * (width + 1))  # [B * (W + 1)] masked entries all land in the sink column
        out.scatter_(0, self.dest, x.reshape(-1))
        return out.view(B, width + 1)[:, :width]

    def flat(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat index into ``[B * T]`` of the valid token at compact position ``pos`` (``< n``) of
        row ``rows`` (int64 ``[E]`` each)."""
        T = self.mask.shape[1]
        if self.kind == "right":
            return rows * T + pos
        if self.kind == "run":
            return rows * T + self.first[rows] + pos
        # the first column whose running count reaches pos + 1
        return torch.searchsorted(self.g.view(-1), rows * (self.width + 1) + pos + 1)


def _first_mismatch(ne: torch.Tensor) -> torch.Tensor:
    """bool ``[..., W]`` (contiguous, ``W % 8 == 0``) -> int64 ``[...]``: index of the first True,
    ``W`` when none.

    The bytes are read as int64 words (8 positions each): ``argmax`` finds the first nonzero word
    (``argmax`` over bytes is slow on CPU; this reads ``W / 8`` of them), and the position inside it
    is the word's lowest set bit, ``8 b`` for byte ``b`` on a little-endian machine (found exactly
    by ``frexp``)."""
    W = ne.shape[-1]
    if sys.byteorder != "little" or W % 8 != 0:  # pragma: no cover - no big-endian CI
        u = ne.contiguous().view(torch.uint8)
        first = u.argmax(-1)  # [...]
        return torch.where(u.amax(-1) > 0, first, torch.full_like(first, W))
    if ne.storage_offset() % 8 or not ne.is_contiguous():
        ne = ne.clone(memory_format=torch.contiguous_format)  # int64 words need 8-byte alignment
    words = ne.view(torch.int64)  # [..., W / 8]
    nzw = words != 0  # [..., W / 8]
    wi = nzw.view(torch.uint8).argmax(-1)  # [...] first nonzero word (0 when none)
    word = words.gather(-1, wi.unsqueeze(-1)).squeeze(-1)  # [...]
    low = word & (-word)  # [...] lowest set bit: 2^(8 b)
    bit = torch.frexp(low.to(torch.float64)).exponent.to(torch.int64) - 1  # [...] 8 b (exact)
    pos = wi * 8 + torch.div(bit, 8, rounding_mode="floor")  # [...]
    return torch.where(word != 0, pos, torch.full_like(pos, W))


def _pair_lcp(ct: torch.Tensor, n: torch.Tensor, slots: Optional[torch.Tensor], K: int, Gm: int):
    """Common-prefix lengths of every pair of one group: int64 ``[K, Gm, Gm]`` (``[k, i, j]`` =
    ``LCP`` of slots ``i`` and ``j`` of group ``k``), -1 on the diagonal and for empty slots."""
    W = ct.shape[1]
    if slots is None:
        cg = ct.view(K, Gm, W)  # [K, Gm, W]
        ng = n.view(K, Gm)  # [K, Gm]
        valid = None
    else:
        rows = slots.clamp_min(0)  # [K, Gm]
        cg = ct[rows]  # [K, Gm, W]
        ng = n[rows]  # [K, Gm]
        valid = slots >= 0  # [K, Gm]
    # every pair (a, a + s) of a group, s = 1 .. Gm - 1, in [K, pairs, W] mismatch buffers of at
    # most _NE_BUDGET bytes (one buffer for the usual sizes)
    per_shift = K * Gm * W  # bytes of one offset's comparisons, at most
    firsts, ia, ib = [], [], []
    s = 1
    while s < Gm:
        e = s + 1  # offsets [s, e) go into one buffer
        while e < Gm and (e - s + 1) * per_shift <= _NE_BUDGET:
            e += 1
        P = sum(Gm - t for t in range(s, e))
        ne = torch.empty(K, P, W, dtype=torch.bool, device=ct.device)  # [K, P, W]
        o = 0
        for t in range(s, e):
            torch.ne(cg[:, :-t], cg[:, t:], out=ne[:, o:o + Gm - t])  # [K, Gm - t, W] pairs (a, a + t)
            ia.extend(range(Gm - t))
            ib.extend(range(t, Gm))
            o += Gm - t
        firsts.append(_first_mismatch(ne))  # [K, P]
        s = e
    ia_t = torch.tensor(ia, dtype=torch.int64, device=ct.device)  # [G (G - 1) / 2]
    ib_t = torch.tensor(ib, dtype=torch.int64, device=ct.device)  # [G (G - 1) / 2]
    first = torch.cat(firsts, 1) if len(firsts) > 1 else firsts[0]  # [K, G (G - 1) / 2]
    l = torch.minimum(first, torch.minimum(ng[:, ia_t], ng[:, ib_t]))  # [K, P] clamped to both lengths
    if valid is not None:
        l = torch.where(valid[:, ia_t] & valid[:, ib_t], l, torch.full_like(l, -1))
    lcp = torch.full((K, Gm, Gm), -1, dtype=torch.int64, device=ct.device)  # [K, Gm, Gm]
    lcp[:, ia_t, ib_t] = l
    lcp[:, ib_t, ia_t] = l
    return lcp, ng


def _group_scale(r: torch.Tensor, valid: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """``s`` per group: ``std + eps`` (unbiased std over the members) or 1. float64 ``[K]``."""
    if scale == "none":
        return torch.ones(r.shape[0], dtype=r.dtype, device=r.device)
    v = valid.to(r.dtype)  # [K, Gm]
    cnt = v.sum(-1)  # [K]
    mean = (r * v).sum(-1) / cnt.clamp_min(1)  # [K]
    var = (((r - mean[:, None]) ** 2) * v).sum(-1) / (cnt - 1).clamp_min(1)  # [K]
    return var.sqrt() + eps  # [K]


def _sparse_deltas(lcp: torch.Tensor, r: torch.Tensor, ng: torch.Tensor):
    """The nonzero TD errors (before scaling) of every slot: positions and values ``[K, Gm, Gm + 1]``
    and which are present. Entry ``j < Gm``: where completion ``j`` leaves ``o_i`` (only the first
    ``j`` of a tie), entry ``Gm``: the last valid token.

    For slot ``i`` and a depth ``p = LCP(i, j)``, the members still on ``o_i`` at depth ``p`` are
    those ``j'`` with ``LCP(i, j') >= p``: each row of ``lcp`` is sorted once (``O(G^2 log G)``
    time, ``O(G^2)`` memory), and the counts and reward sums of the members at ``>= p`` and
    ``> p`` are suffix sums read at ``searchsorted`` positions."""
    K, Gm, _ = lcp.shape
    a, order = lcp.sort(stable=True, dim=-1)  # [K, Gm(i), Gm] ascending LCP(i, .) (ties keep the index order)
    ra = r.unsqueeze(1).expand(K, Gm, Gm).gather(-1, order)  # [K, Gm, Gm] rewards in that order
    zero = torch.zeros(K, Gm, 1, dtype=r.dtype, device=r.device)
    suf = torch.cat([ra.flip(-1).cumsum(-1).flip(-1), zero], -1)  # [K, Gm, Gm + 1] suffix reward sums
    lo = torch.searchsorted(a, lcp, right=False)  # [K, Gm, Gm] first sorted index with LCP >= LCP(i, j)
    hi = torch.searchsorted(a, lcp, right=True)  # [K, Gm, Gm] first sorted index with LCP > LCP(i, j)
    cnt_ge, sum_ge = (Gm - lo).to(r.dtype), suf.gather(-1, lo)  # [K, Gm, Gm] others still on o_i at LCP(i, j)
    cnt_gt, sum_gt = (Gm - hi).to(r.dtype), suf.gather(-1, hi)  # [K, Gm, Gm] ... one token deeper
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(Gm, device=lcp.device).expand_as(order))
    tie_before = inv != lo  # [K, Gm, Gm] an earlier j' has the same LCP with i (stable sort: it comes first)
    L = a[..., -1]  # [K, Gm] deepest prefix shared with another member (-1: none)
    bp_on = (lcp >= 0) & (lcp < L.unsqueeze(-1)) & ~tie_before  # [K, Gm, Gm]
    # V(p + 1) - V(p) at p = LCP(i, j): the mean over the others deeper than p minus over those at >= p
    bp_val = sum_gt / cnt_gt.clamp_min(1) - sum_ge / cnt_ge.clamp_min(1)  # [K, Gm, Gm]
    top = ((lcp == L.unsqueeze(-1)) & (lcp >= 0)).to(r.dtype)  # [K, Gm, Gm] the others sharing the deepest prefix
    fin_val = r - (top * r[:, None, :]).sum(-1) / top.sum(-1).clamp_min(1)  # [K, Gm]: R_i - V_i(L_i)
    fin_pos = ng - 1  # [K, Gm]
    fin_on = (L >= 0) & (ng > 0)  # [K, Gm]
    same = bp_on & (lcp == fin_pos.unsqueeze(-1))  # [K, Gm, Gm] a leave point on the last token
    bp_val = bp_val + same.to(r.dtype) * fin_val.unsqueeze(-1)
    fin_on = fin_on & ~same.any(-1)
    pos = torch.cat([lcp, fin_pos.unsqueeze(-1)], -1)  # [K, Gm, Gm + 1]
    val = torch.cat([bp_val, fin_val.unsqueeze(-1)], -1)  # [K, Gm, Gm + 1]
    on = torch.cat([bp_on, fin_on.unsqueeze(-1)], -1)  # [K, Gm, Gm + 1]
    return pos, val, on


def _step_entries(lcp: torch.Tensor, r: torch.Tensor, ng: torch.Tensor, bc: torch.Tensor):
    """The nonzero step-level TD errors (before scaling), in compact coordinates: ``(slot, pos,
    val)``, int64 / int64 / float64 ``[E]``.

    ``bc``: the compacted boundary of every slot, bool ``[K * Gm, T]``. The step starts of a slot
    are 0 and each ``m < n`` after a boundary token; the TD error sits on the last token of each
    step: ``V(next start) - V(this start)`` at ``m - 1`` for every start ``m > 0``, and
    ``R_i - V(last start)`` at ``n - 1``. ``V(m)`` is read off the slot's sorted common-prefix
    lengths (members with ``LCP >= min(m, L_i)``), only at the step starts."""
    K, Gm, _ = lcp.shape
    R, T = bc.shape
    dev = bc.device
    l = lcp.reshape(R, Gm)  # [R, Gm]
    n = ng.reshape(R)  # [R]
    L = l.amax(-1)  # [R] deepest prefix shared with another member (-1: none)
    a, order = l.sort(-1)  # [R, Gm] ascending; -1 (not another member) first
    member = (a >= 0).to(r.dtype)  # [R, Gm]
    ra = r.repeat_interleave(Gm, 0).gather(1, order) * member  # [R, Gm] their rewards in that order
    zero = torch.zeros(R, 1, dtype=r.dtype, device=dev)
    suf_sum = torch.cat([ra.flip(-1).cumsum(-1).flip(-1), zero], -1)  # [R, Gm + 1]
    suf_cnt = torch.cat([member.flip(-1).cumsum(-1).flip(-1), zero], -1)  # [R, Gm + 1]
    live = (L >= 0) & (n > 0)  # [R] slots with a baseline and a valid token
    start = torch.empty(R, T, dtype=torch.bool, device=dev)  # [R, T] step starts
    start[:, 0] = live
    if T > 1:
        torch.logical_and(bc[:, :-1], torch.arange(1, T, device=dev)[None, :] < n[:, None], out=start[:, 1:])
        start[:, 1:] &= live[:, None]
    rs, ms = start.nonzero(as_tuple=True)  # [S] each, row-major: the starts of a slot in order
    depth = torch.minimum(ms, L[rs])  # [S]
    c = (a[rs] < depth[:, None]).sum(-1)  # [S] members below the depth (sorted first)
    V = suf_sum[rs, c] / suf_cnt[rs, c].clamp_min(1)  # [S] V_i(m) at each step start
    mid = ms > 0  # [S] a start after a boundary: the previous entry is the previous start
    prev = torch.cat([V[:1], V[:-1]])  # [S]
    last = torch.ones_like(mid)  # [S] the last start of its slot
    last[:-1] = rs[1:] != rs[:-1]
    slot = torch.cat([rs[mid], rs[last]])  # [E]
    pos = torch.cat([ms[mid] - 1, n[rs[last]] - 1])  # [E]
    val = torch.cat([(V - prev)[mid], r.reshape(R)[rs[last]] - V[last]])  # [E]
    return slot, pos, val


# ----------------------------------------------------------------------------- public API
def prefix_td(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              group_size: Optional[int] = None, *, group_ids: Optional[torch.Tensor] = None,
              scale: str = "std", eps: float = 1e-4,
              boundary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group prefix-tree TD error, leave-one-out: a critic-free per-token TD error ``[B, T]``.

    The completions of one prompt form a prefix tree. ``V_i(k)``, the value of the state before
    valid token ``k`` of row ``i``, is the mean reward of the *other* members of its group whose
    valid tokens share ``o_i[:k]`` (past the point where ``o_i`` leaves them all: the value of
    the last shared prefix); ``V_i(n_i) = R_i``. Valid token ``k`` gets
    ``(V_i(k + 1) - V_i(k)) / s``, ``s = std_G(R) + eps`` (unbiased) or 1 (``scale="none"``).
    Rows sum to the RLOO advantage; GAE over it is
    ``traced_credit(prefix_td(...), mask, DecayStyle("recent", gamma, lam))``.

    Args:
        tokens: integer ``[B, T]`` token ids (only valid positions are read).
        mask: bool or integer ``[B, T]``, nonzero = valid completion token; any pattern
            (left/right padding, several runs): positions count valid tokens only.
        rewards: float ``[B]``, finite.
        group_size: ``G``; rows ``[k G, (k + 1) G)`` share a prompt. Must divide ``B``.
        group_ids: int ``[B]`` instead of ``group_size``: equal ids form a group (any order and
            sizes).
        scale: ``"std"`` or ``"none"``.
        eps: added to the std (``>= 0``).
        boundary: optional bool (or integer 0/1) ``[B, T]``, True where a token ends a step (e.g. a newline;
            flags at masked positions are ignored): the step-level variant. The step starts of a
            row are valid position 0 and each valid position ``m < n_i`` whose previous valid
            token is a boundary; with ``b_i(k)`` the last step start ``<= k``, ``V`` is replaced by
            ``V^step_i(k) = V_i(b_i(k))`` (``V^step_i(n_i) = R_i``). The TD error then sits on the
            last token of each step and GAE(1, 1) gives every token of a step
            ``(R_i - V_i(step start)) / s``. All-True boundaries give the token-level result.

    Returns:
        ``[B, T]`` in the dtype of ``rewards`` (computed in float64), 0 at masked positions, for
        groups of one and for rows without valid tokens. Not differentiable: rewards are data,
        the result never requires grad.

    Cost: ``O(B G T)`` byte comparisons (every pair of a group, whole rows, whatever the data)
    and ``O(B G log G)`` small float64 sorts and sums; memory ``O(B G + B T)`` beyond the inputs
    (the pair comparisons go through buffers of at most 64 MiB); no Python loop over tokens, rows
    or groups. This is the TD error; :class:`creditlib.modules.PrefixGAE` writes GAE over it.

    ``torch.compile(fullgraph=True)`` compiles it: the work is one opaque custom op
    (``creditlib::prefix_td``), so the graph holds one node and no data-dependent branch.
    """
    tokens = _check_tokens(tokens)
    B, T = tokens.shape
    mask = check_mask(mask, tokens, "tokens")
    rewards = _check_rewards_shape(rewards, B, tokens.device)
    scale = check_scale(scale)
    eps = check_eps(eps)
    G = _validate_groups(B, group_size, group_ids)
    boundary = _check_boundary(boundary, tokens)
    if group_ids is not None:
        group_ids = group_ids.to(tokens.device)
    return _prefix_td_op(tokens, mask, rewards.detach(), G, group_ids, scale, eps, boundary)


@torch.library.custom_op("creditlib::prefix_td", mutates_args=())
def _prefix_td_op(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: Optional[int],
                  group_ids: Optional[torch.Tensor], scale: str, eps: float,
                  boundary: Optional[torch.Tensor]) -> torch.Tensor:
    _check_finite_rewards(rewards)
    return _prefix_td_impl(tokens, mask, rewards, group_size, group_ids, scale, eps, boundary)


@_prefix_td_op.register_fake
def _(tokens, mask, rewards, group_size, group_ids, scale, eps, boundary):
    return tokens.new_empty(tokens.shape, dtype=rewards.dtype)  # [B, T]


def _group_tree(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, K: int, Gm: int,
                slots: Optional[torch.Tensor]):
    """Each group's prefix tree, read back from the tokens (shared by ``prefix_td`` and TreeRL's rule).

    Returns ``(lay, n, lcp, ng, r, valid, rows)``: the compact :class:`_Layout` of the valid tokens,
    ``n`` ``[B]`` valid tokens per row, ``lcp`` ``[K, Gm, Gm]`` pairwise common-prefix lengths (-1 on the
    diagonal and for empty slots), ``ng`` ``[K, Gm]`` the slots' lengths, ``r`` ``[K, Gm]`` float64
    rewards (0 in empty slots), ``valid`` ``[K, Gm]`` filled slots, ``rows`` ``[K, Gm]`` their rows.
    Call under ``torch.no_grad()`` with a bool mask and validated groups (:func:`_group_slots`)."""
    B = tokens.shape[0]
    dev = tokens.device
    mask = _canonical(mask)  # [B, T]
    lay = _Layout(mask)
    n = lay.n  # [B]
    ct = lay.compact(tokens, lay.width)  # [B, W], W: a whole number of 8-byte words (see _first_mismatch)
    lcp, ng = _pair_lcp(ct, n, slots, K, Gm)  # [K, Gm, Gm], [K, Gm]
    r64 = rewards.detach().to(torch.float64)  # [B]
    if slots is None:
        r = r64.view(K, Gm)  # [K, Gm]
        valid = torch.ones(K, Gm, dtype=torch.bool, device=dev)  # [K, Gm]
        rows = torch.arange(B, device=dev).view(K, Gm)  # [K, Gm]
    else:
        valid = slots >= 0  # [K, Gm]
        rows = slots.clamp_min(0)  # [K, Gm]
        r = torch.where(valid, r64[rows], torch.zeros((), dtype=torch.float64, device=dev))  # [K, Gm]
    return lay, n, lcp, ng, r, valid, rows


def _prefix_td_impl(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: Optional[int],
                    group_ids: Optional[torch.Tensor], scale: str, eps: float,
                    boundary: Optional[torch.Tensor]) -> torch.Tensor:
    """prefix_td on validated inputs (bool mask and boundary, finite detached rewards)."""
    B, T = tokens.shape
    K, Gm, slots = _group_slots(B, group_size, group_ids, tokens.device)
    dev = tokens.device
    out = torch.zeros(B, T, dtype=rewards.dtype, device=dev)  # [B, T]
    if B == 0 or T == 0 or Gm < 2:
        return out
    with torch.no_grad():
        lay, n, lcp, ng, r, valid, rows = _group_tree(tokens, mask, rewards, K, Gm, slots)
        W = lay.width
        s = _group_scale(r, valid, scale, eps)  # [K]
        inv_s = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))  # [K]
        if boundary is None:
            pos, val, on = _sparse_deltas(lcp, r, ng)  # [K, Gm, Gm + 1] each
            val = val * inv_s[:, None, None]
            on = on & valid.unsqueeze(-1)
            rr = rows.unsqueeze(-1).expand_as(pos)[on]  # [E] row of each nonzero
            out.view(-1)[lay.flat(rr, pos[on])] = val[on].to(out.dtype)
            return out
        bc = lay.compact(boundary, W)[:, :T]  # [B, T] compacted
        if slots is not None:
            bc = bc[rows.reshape(-1)]  # [K * Gm, T] per slot
        slot, pos, val = _step_entries(lcp, r, ng, bc)  # [E] each
        keep = valid.reshape(-1)[slot]  # [E]
        slot, pos = slot[keep], pos[keep]
        val = val[keep] * inv_s[torch.div(slot, Gm, rounding_mode="floor")]  # [E]
        out.view(-1)[lay.flat(rows.reshape(-1)[slot], pos)] = val.to(out.dtype)
        return out
