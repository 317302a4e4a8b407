"""Turn and step credit (issue 17): creditlib.ops.turns (naive beside vectorised), the functional
re-exports, the four registry kinds and the TensorDict modules.

The plain loops of ``creditlib.ops.turns.naive`` hold the vectorised form on random turn structures;
small cases are worked out by hand below (the numbers are written out); the broadcast test is the
one SkyRL#1492 would have failed (an advantage moved by one turn or one row)."""

from __future__ import annotations

import math

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.credit import ADVANTAGES, CreditMethod, get_credit, list_credits
from creditlib.ops.turns import (KINDS, implicit_process_rewards_naive, turn_credit_naive, turn_ends_naive,
                                 turn_ids_from_mask_naive, turn_returns_naive)

EPS = 1e-4


# ============================================================================ data
def _random_turns(B=12, T=36, seed=0, vocab=3, dtype=torch.float64, empty_rows=(1,), id_gaps=True, merge=True):
    """Random multi-turn rows: policy runs and observation gaps (masked), right padding, steps
    inside some turns (a boundary), rows without tokens, turn ids with gaps (a turn without
    tokens) and turns split by an observation (non-contiguous). Tokens share prefixes.

    Returns ``(ids [B, T], tokens [B, T], turn_rewards [B, K], rewards [B], state_ids [B, K])``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
    for i in range(B):
        t = int(torch.randint(0, 3, (1,), generator=g))
        end = int(torch.randint(T // 2, T + 1, (1,), generator=g))
        while t < end:
            run = int(torch.randint(1, 6, (1,), generator=g))
            mask[i, t:min(t + run, end)] = True
            t += run + int(torch.randint(1, 4, (1,), generator=g))
    for i in empty_rows:
        mask[i] = False
    boundary = torch.rand(B, T, generator=g) < 0.1  # [B, T] a few steps inside turns
    ids = turn_ids_from_mask_naive(mask, boundary)  # [B, T]
    Kmax = int(ids.max()) + 1
    if merge:  # some turns span an observation: turn k + 1 merged into turn k (ids shift down)
        for i in range(B):
            if int(ids[i].max()) >= 2 and bool(torch.rand(1, generator=g) < 0.5):
                ids[i] = torch.where(ids[i] >= 2, ids[i] - 1, ids[i])
    if id_gaps:  # some turns without tokens: ids skip a value
        skip = (torch.rand(B, Kmax + 1, generator=g) < 0.2).long().cumsum(1)  # [B, Kmax + 1]
        ids = torch.where(ids >= 0, ids + skip.gather(1, ids.clamp_min(0)), ids)
    n = ids.amax(1) + 1  # [B]
    K = int(n.max()) + 1
    tokens = torch.randint(0, vocab, (B, T), generator=g)  # [B, T]
    tokens[:, :5] = tokens[0, :5]  # a shared opening
    live = torch.arange(K) < n[:, None]  # [B, K]
    tr = torch.randn(B, K, generator=g, dtype=dtype) * live * (torch.rand(B, K, generator=g) < 0.7)  # [B, K]
    rewards = torch.randint(0, 2, (B,), generator=g).to(dtype)  # [B]
    rewards[-2:] = torch.rand(2, generator=g, dtype=torch.float64).to(dtype)
    states = torch.randint(-1, 3, (B, K), generator=g)  # [B, K] few states: many revisits
    return ids, tokens, tr, rewards, states


def _kind_kwargs(kind, tokens, states):
    if kind == "anchor-state":
        return {"state_ids": states}
    if kind == "prefix-turn":
        return {"tokens": tokens}
    return {}


GROUPINGS = ["size", "ids"]


def _groups(B, how, seed=0):
    """(group_size, group_ids): groups of 4 in row order, or shuffled arbitrary ids of uneven sizes
    (one group of one)."""
    if how == "size":
        return 4, None
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0] * 5 + [1] * 3 + [2] * (B - 9) + [3])  # sizes 5, 3, B - 9, 1
    return None, (base * 7 + 3)[torch.randperm(B, generator=g)]


# ============================================================================ naive vs vectorised
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", GROUPINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_naive(kind, how, seed):
    ids, tokens, tr, r, st = _random_turns(seed=seed)
    B = ids.shape[0]
    gs, gids = _groups(B, how, seed)
    kw = _kind_kwargs(kind, tokens, st)
    settings = [dict(scale="std"), dict(scale="none"), dict(scale="std", eps=0.0)]
    if kind == "prefix-turn":
        settings += [dict(scale="std", gae_gamma=0.9, gae_lam=0.5), dict(scale="none", gae_lam=0.0)]
    else:
        settings += [dict(scale="std", gamma=0.7, omega=0.3), dict(scale="none", gamma=0.0, omega=2.0)]
    for opts in settings:
        for per_turn in (False, True):
            got = F.turn_credit(kind, ids, tr, r, gs, group_ids=gids, per_turn=per_turn, **kw, **opts)
            want = turn_credit_naive(kind, ids, tr, r, gs, group_ids=gids, per_turn=per_turn, **kw, **opts)
            assert got.dtype == torch.float64 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{kind} {opts} per_turn={per_turn}")
        assert bool(got.abs().sum() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_no_turn_rewards_and_mask(kind):
    ids, tokens, tr, r, st = _random_turns(seed=5, dtype=torch.float32)
    mask = ids >= 0
    kw = _kind_kwargs(kind, tokens, st)
    got = F.turn_credit(kind, ids, None, r, 4, mask=mask.long(), **kw)  # integer mask accepted
    want = turn_credit_naive(kind, ids, None, r, 4, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # turn_ids=None: the runs of valid tokens of the mask
    runs = F.turn_ids_from_mask(mask)
    got2 = F.turn_credit(kind, None, None, r, 4, mask=mask, **kw)
    torch.testing.assert_close(got2.double(), turn_credit_naive(kind, runs, None, r, 4, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_padded(kind):
    ids, tokens, tr, r, st = _random_turns(seed=7)
    B, T = ids.shape
    g = torch.Generator().manual_seed(1)
    last = torch.where(ids >= 0, torch.arange(T), torch.full_like(ids, -1)).amax(1)  # [B] last valid column
    lens = [int(last[i]) + 1 + int(torch.randint(0, 3, (1,), generator=g)) if last[i] >= 0 else
            int(torch.randint(0, 3, (1,), generator=g)) for i in range(B)]
    lens = [min(L, T) for L in lens]
    cu = torch.tensor([0] + lens).cumsum(0)  # [B + 1]
    p_ids = torch.cat([ids[i, :lens[i]] for i in range(B)])  # [N]
    p_tok = torch.cat([tokens[i, :lens[i]] for i in range(B)])  # [N]
    kw = _kind_kwargs(kind, p_tok, st)
    kw_pad = _kind_kwargs(kind, tokens, st)
    got = F.turn_credit(kind, p_ids, tr, r, 4, cu_seqlens=cu, gamma=1.0, **kw)  # [N]
    pad = F.turn_credit(kind, ids, tr, r, 4, **kw_pad)  # [B, T]
    want = torch.cat([pad[i, :lens[i]] for i in range(B)])
    assert got.shape == (int(cu[-1]),)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.turn_credit(kind, p_ids, tr, r, 4, cu_seqlens=cu, per_turn=True, **kw),
                               F.turn_credit(kind, ids, tr, r, 4, per_turn=True, **kw_pad), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.turn_returns(p_ids, tr, r, gamma=0.8, cu_seqlens=cu), F.turn_returns(ids, tr, r, gamma=0.8))
    # the packed mask alone (turn_ids=None) cuts the same turns as the padded mask
    pm = p_ids >= 0
    torch.testing.assert_close(F.turn_credit(kind, None, None, r, 4, mask=pm, cu_seqlens=cu, **kw),
                               torch.cat([F.turn_credit(kind, None, None, r, 4, mask=ids >= 0, **kw_pad)[i, :lens[i]]
                                          for i in range(B)]))


def test_ids_ends_returns_and_process_rewards_match_naive():
    g = torch.Generator().manual_seed(3)
    for seed in range(4):
        mask = torch.rand(9, 40, generator=g) > 0.35
        mask[2] = False
        mask[3] = True
        boundary = torch.rand(9, 40, generator=g) < 0.2
        for bnd in (None, boundary, boundary.long()):
            ids = F.turn_ids_from_mask(mask.long(), bnd)
            assert ids.dtype == torch.int64 and torch.equal(ids, turn_ids_from_mask_naive(mask, bnd))
        ids, _, tr, r, _ = _random_turns(seed=seed)
        assert torch.equal(F.turn_ends(ids), turn_ends_naive(ids))
        for gamma in (1.0, 0.9, 0.3, 0.0):
            torch.testing.assert_close(F.turn_returns(ids, tr, r, gamma=gamma), turn_returns_naive(ids, tr, r, gamma),
                                       rtol=1e-12, atol=1e-12)
        x = torch.randn(ids.shape, generator=g, dtype=torch.float64)
        x[ids < 0] = float("nan")  # masked log-ratios are ignored, even NaN
        torch.testing.assert_close(F.implicit_process_rewards(x, ids, beta=0.5),
                                   implicit_process_rewards_naive(x.nan_to_num(0.0), ids, 0.5))
    # many turns (several 128-column blocks of the discounted suffix sum)
    ids = torch.arange(300).repeat_interleave(2)[None, :].repeat(2, 1)  # [2, 600], 300 turns
    tr = torch.randn(2, 300, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.turn_returns(ids, tr, gamma=0.97), turn_returns_naive(ids, tr, None, 0.97),
                               rtol=1e-10, atol=1e-10)


def test_implicit_process_rewards_gradient_and_dtype():
    ids = torch.tensor([[0, 0, -1, 1, 1, 1], [-1, 0, 0, 0, -1, -1]])
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    p = F.implicit_process_rewards(x, ids, beta=2.0)  # [2, 2]
    want = torch.stack([2 * x[0, :2].sum(), 2 * x[0, 3:].sum(), 2 * x[1, 1:4].sum(), torch.zeros((), dtype=x.dtype)])
    torch.testing.assert_close(p.reshape(-1), want)
    (g,) = torch.autograd.grad(p.sum(), x)
    torch.testing.assert_close(g, 2.0 * (ids >= 0).double())
    assert F.implicit_process_rewards(x.detach().to(torch.bfloat16), ids).dtype == torch.bfloat16
    bad = x.detach().clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="row 1, position 2"):
        F.implicit_process_rewards(bad, ids)
    # PRIME's process rewards enter the turn credit as turn_rewards (step ids in place of turns)
    adv = F.turn_credit("turn-index", ids, p.detach(), None, 2)
    assert adv.shape == (2, 6) and bool((adv[ids < 0] == 0).all())


# ============================================================================ hand-computed cases
# Three rows of one group, T = 8 (observations masked between turns):
#   row 0: turns 0, 1;     turn_rewards [1, 0, 0],   reward 1 -> r = [1, 1]      G = [2, 1]
#   row 1: turns 0, 1, 2;  turn_rewards [0.5, 2, 0], reward 0 -> r = [0.5, 2, 0] G = [2.5, 2, 0]
#   row 2: turn 0;         turn_rewards [0, 0, 0],   reward 3 -> r = [3]         G = [3]
HAND_IDS = torch.tensor([[0, 0, -1, 1, 1, -1, -1, -1],
                         [0, -1, 1, -1, 2, 2, -1, -1],
                         [0, 0, 0, -1, -1, -1, -1, -1]])
HAND_TR = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
HAND_R = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
HAND_STATES = torch.tensor([[7, 8, 7], [7, 7, 8], [8, 5, 5]])  # entries at k >= K_i are ignored


def _per_turn(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_returns():
    torch.testing.assert_close(F.turn_returns(HAND_IDS, HAND_TR, HAND_R), _per_turn([[2, 1, 0], [2.5, 2, 0], [3, 0, 0]]))
    # gamma 0.5: row 0 [1 + 0.5 * 1, 1], row 1 [0.5 + 0.5 * 2 + 0, 2, 0], row 2 [3]
    torch.testing.assert_close(F.turn_returns(HAND_IDS, HAND_TR, HAND_R, gamma=0.5),
                               _per_turn([[1.5, 1, 0], [1.5, 2, 0], [3, 0, 0]]))
    # a row without tokens: G_0 = its reward (it still counts in episode baselines)
    ids = torch.tensor([[0, 1], [-1, -1]])
    torch.testing.assert_close(F.turn_returns(ids, None, torch.tensor([1.0, 4.0])), torch.tensor([[1.0, 1.0], [4.0, 0.0]]))


def test_hand_turn_grpo():
    # G_0 = [2, 2.5, 3]: A_0 = 2 - (2.5 + 3) / 2 = -0.75, A_1 = 2.5 - 2.5 = 0, A_2 = 3 - 2.25 = 0.75
    A = F.turn_credit("turn-grpo", HAND_IDS, HAND_TR, HAND_R, 3, scale="none", per_turn=True)
    torch.testing.assert_close(A, _per_turn([[-0.75, -0.75, 0], [0, 0, 0], [0.75, 0, 0]]))
    s = 0.5 + EPS  # std{2, 2.5, 3} = 0.5
    adv = F.turn_credit("turn-grpo", HAND_IDS, HAND_TR, HAND_R, 3)  # [3, 8]
    want = torch.tensor([[-0.75, -0.75, 0, -0.75, -0.75, 0, 0, 0], [0] * 8, [0.75, 0.75, 0.75, 0, 0, 0, 0, 0]],
                        dtype=torch.float64) / s
    torch.testing.assert_close(adv, want)


def test_hand_turn_index():
    # k = 0: as turn-grpo. k = 1: rows 0, 1 reached it, G = 1, 2: A = -1, +1. k = 2: only row 1: 0.
    A = F.turn_credit("turn-index", HAND_IDS, HAND_TR, HAND_R, 3, scale="none", per_turn=True)
    torch.testing.assert_close(A, _per_turn([[-0.75, -1, 0], [0, 1, 0], [0.75, 0, 0]]))
    s1 = math.sqrt(0.5) + EPS  # std{1, 2}
    adv = F.turn_credit("turn-index", HAND_IDS, HAND_TR, HAND_R, 3)
    want = torch.tensor([[-0.75 / 0.5001, -0.75 / 0.5001, 0, -1 / s1, -1 / s1, 0, 0, 0],
                         [0, 0, 1 / s1, 0, 0, 0, 0, 0],
                         [0.75 / 0.5001] * 3 + [0] * 5], dtype=torch.float64)
    torch.testing.assert_close(adv, want)


def test_hand_anchor_state():
    # returns by state (own turns included): state 7: (0,0) 2, (1,0) 2.5, (1,1) 2; state 8: (0,1) 1,
    # (1,2) 0, (2,0) 3. A^S against the OTHER rows' turns from the same state:
    #   (0,0): 2 - mean(2.5, 2) = -0.25   (0,1): 1 - mean(0, 3) = -0.5
    #   (1,0): 2.5 - 2 = 0.5              (1,1): 2 - 2 = 0 (row 1's own turn 0 is not its baseline)
    #   (1,2): 0 - mean(1, 3) = -2        (2,0): 3 - mean(1, 0) = 2.5
    # A = A^E + 0.5 A^S, A^E = [-0.75, 0, 0.75]
    A = F.turn_credit("anchor-state", HAND_IDS, HAND_TR, HAND_R, 3, state_ids=HAND_STATES, omega=0.5, scale="none",
                      per_turn=True)
    torch.testing.assert_close(A, _per_turn([[-0.875, -1.0, 0], [0.25, 0, -1.0], [2.0, 0, 0]]))
    # scale="std": s_7 = std{2, 2.5, 2} = sqrt(1/12), s_8 = std{1, 0, 3} = sqrt(7/3); s_E = 0.5
    s7, s8, sE = math.sqrt(1 / 12) + EPS, math.sqrt(7 / 3) + EPS, 0.5 + EPS
    A = F.turn_credit("anchor-state", HAND_IDS, HAND_TR, HAND_R, 3, state_ids=HAND_STATES, per_turn=True)
    want = [[-0.75 / sE - 0.25 / s7, -0.75 / sE - 0.5 / s8, 0], [0.5 / s7, 0, -2 / s8], [0.75 / sE + 2.5 / s8, 0, 0]]
    torch.testing.assert_close(A, _per_turn(want))
    # an unknown state (-1) or a state no other row saw: A^S = 0, only the episode advantage
    st = HAND_STATES.clone()
    st[0, 0] = -1
    st[2, 0] = 9
    A = F.turn_credit("anchor-state", HAND_IDS, HAND_TR, HAND_R, 3, state_ids=st, scale="none", per_turn=True)
    # state 8 now: (0,1) 1, (1,2) 0: (0,1): 1 - 0 = 1; (1,2): 0 - 1 = -1; state 7: (1,0) 2.5 and (1,1) 2 are row 1's own
    torch.testing.assert_close(A, _per_turn([[-0.75, -0.75 + 1, 0], [0, 0, -1], [0.75, 0, 0]]))


# prefix-turn: compact policy tokens, turn 0 | turn 1 (masked observation tokens in between are ignored)
#   row 0: [5, 6] | [7, 8]   R = 1
#   row 1: [5, 6] | [7, 9]   R = 0
#   row 2: [5, 4] | [1]      R = 2
PT_TOKENS = torch.tensor([[5, 6, 99, 7, 8, 0, 0], [5, 6, 98, 98, 7, 9, 0], [5, 4, 97, 1, 0, 0, 0]])
PT_IDS = torch.tensor([[0, 0, -1, 1, 1, -1, -1], [0, 0, -1, -1, 1, 1, -1], [0, 0, -1, 1, -1, -1, -1]])
PT_R = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)


def test_hand_prefix_turn():
    # V_i(start of turn 0) = mean of the others: row 0 (0 + 2) / 2 = 1, row 1 1.5, row 2 0.5.
    # V_i(start of turn 1): row 0 shares [5, 6] with row 1 only: 0; row 1: 1; row 2 left the others after
    # [5]: the value of that prefix, 0.5. GAE(1, 1): A = R - V(start).
    A = F.turn_credit("prefix-turn", PT_IDS, None, PT_R, 3, tokens=PT_TOKENS, scale="none", per_turn=True)
    torch.testing.assert_close(A, _per_turn([[0, 1], [-1.5, -1], [1.5, 1.5]]))
    # gae_lam 0.5: D = [V(start 1) - V(start 0), R - V(start 1)]: row 0 [-1, 1] -> [-1 + 0.5, 1];
    # row 1 [-0.5, -1] -> [-1, -1]; row 2 [0, 1.5] -> [0.75, 1.5]
    A = F.turn_credit("prefix-turn", PT_IDS, None, PT_R, 3, tokens=PT_TOKENS, scale="none", gae_lam=0.5,
                      per_turn=True)
    torch.testing.assert_close(A, _per_turn([[-0.5, 1], [-1, -1], [0.75, 1.5]]))
    # per token, scale std (std{1, 0, 2} = 1)
    adv = F.turn_credit("prefix-turn", PT_IDS, None, PT_R, 3, tokens=PT_TOKENS)
    want = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [-1.5, -1.5, 0, 0, -1, -1, 0], [1.5, 1.5, 0, 1.5, 0, 0, 0]],
                        dtype=torch.float64) / (1 + EPS)
    torch.testing.assert_close(adv, want)
    # the same totals split into turn rewards: R_i = G_{i,0} with gamma 1
    tr = torch.tensor([[0.5, 0.5], [1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(F.turn_credit("prefix-turn", PT_IDS, tr, None, 3, tokens=PT_TOKENS), want)


# ============================================================================ properties
def test_broadcast_puts_each_turn_advantage_on_exactly_its_tokens():
    """SkyRL#1492: step advantages broadcast onto the wrong spans. Every A[i, k] here is distinct,
    so an advantage moved by one turn or one row, or spilled onto an observation, fails."""
    ids = torch.tensor([[-1, 0, 0, -1, -1, 1, 1, 1, -1, 2, 2, 3],
                        [0, 0, 0, -1, 1, -1, 2, 2, 2, 2, -1, -1],
                        [0, -1, -1, 2, 2, -1, 3, -1, -1, -1, -1, -1],  # turn 1 has no tokens
                        [0, 0, -1, 1, 1, -1, -1, 1, 1, 2, -1, -1]])  # turn 1 spans an observation
    g = torch.Generator().manual_seed(0)
    tr = torch.rand(4, 4, generator=g, dtype=torch.float64) * (torch.arange(4) < ids.amax(1)[:, None] + 1)
    r = torch.rand(4, generator=g, dtype=torch.float64)
    A = F.turn_credit("turn-index", ids, tr, r, 4, per_turn=True)  # [4, 4]
    live = torch.arange(4) < ids.amax(1)[:, None] + 1
    assert torch.unique(A[live]).numel() == int(live.sum())  # distinct: any misplacement changes a value
    adv = F.turn_credit("turn-index", ids, tr, r, 4)  # [4, 12]
    want = torch.zeros(4, 12, dtype=torch.float64)
    for i in range(4):
        for t in range(12):
            if ids[i, t] >= 0:
                want[i, t] = A[i, ids[i, t]]
    assert torch.equal(adv, want)
    assert bool((adv[ids < 0] == 0).all()) and bool((adv[ids >= 0] != 0).all())
    # the broadcasts that SkyRL#1492-style bugs produce differ from the result
    Ap = torch.cat([A, torch.zeros(4, 1, dtype=A.dtype)], 1)
    wrong = {
        "next turn": Ap.gather(1, (ids + 1).clamp(0, 4)) * (ids >= 0),
        "previous turn": Ap.gather(1, (ids - 1).clamp_min(0)) * (ids >= 0),
        "next row": A.roll(1, 0).gather(1, ids.clamp_min(0)) * (ids >= 0),
        "observations too": A.gather(1, ids.cummax(1).values.clamp_min(0)),
    }
    for name, w in wrong.items():
        assert not torch.allclose(adv, w), name


@pytest.mark.parametrize("kind", KINDS)
def test_leave_one_out_own_returns_never_enter_the_own_baseline(kind):
    """scale="none": the baseline is the row's own return(s) minus A. Changing row i's own rewards
    (same turns) moves A_i only through its own return: the baseline stays, while the others' move."""
    ids, tokens, tr, r, st = _random_turns(seed=11)
    kw = _kind_kwargs(kind, tokens, st)
    B, K = tr.shape
    Ks = (ids.amax(1) + 1).tolist()
    live = torch.arange(K) < ids.amax(1)[:, None] + 1  # [B, K]
    has = torch.zeros(B, K, dtype=torch.bool)  # [B, K] a baseline exists (some other row to compare with)
    for i in range(B):
        grp = [j for j in range(B) if j // 4 == i // 4 and j != i]
        for k in range(Ks[i]):
            if kind == "turn-index":
                has[i, k] = any(Ks[j] > k for j in grp)
            elif kind == "anchor-state":
                u = int(st[i, k])
                has[i, k] = u >= 0 and any(int(st[j, k2]) == u for j in grp for k2 in range(Ks[j]))
            else:
                has[i, k] = True

    def baseline(tr_, r_, gamma):
        G = F.turn_returns(ids, tr_, r_, gamma=gamma)  # [B, K]
        A = F.turn_credit(kind, ids, tr_, r_, 4, scale="none", gamma=gamma, omega=0.5, per_turn=True, **kw)
        if kind == "turn-index":
            return G - A
        if kind == "anchor-state":  # A = (G_0 - b^E) + 0.5 (G_k - b^S) where turns from the state exist
            return G[:, :1] + 0.5 * G * has - A
        return G[:, :1] - A  # turn-grpo; prefix-turn at GAE(1, 1): V_i(start of turn k)

    gamma = 1.0 if kind == "prefix-turn" else 0.8
    base = baseline(tr, r, gamma)
    g = torch.Generator().manual_seed(2)
    for i in (0, 5, 10):
        tr2, r2 = tr.clone(), r.clone()
        tr2[i] += torch.randn(K, generator=g, dtype=tr.dtype) * live[i]
        r2[i] += 3.0
        base2 = baseline(tr2, r2, gamma)
        assert bool(has[i].any())
        torch.testing.assert_close(base2[i][has[i]], base[i][has[i]], rtol=1e-10, atol=1e-10)
        others = [j for j in range(B) if j // 4 == i // 4 and j != i and has[j].any()]
        assert any(not torch.allclose(base2[j][has[j]], base[j][has[j]]) for j in others), "the others' do move"


def test_prefix_turn_at_gae_one_is_return_minus_prefix_value_at_turn_start():
    """(R_i - V_i(start of turn k)) / s, read off the token-level F.prefix_td with GAE(1, 1) at each
    turn's first token."""
    for seed in (0, 1, 2):
        ids, tokens, tr, r, _ = _random_turns(seed=seed, vocab=2)
        for gs, gids in (_groups(ids.shape[0], "size"), _groups(ids.shape[0], "ids", seed)):
            mask = ids >= 0
            R = F.turn_returns(ids, tr, r)[:, 0]  # [B] undiscounted totals
            tok = F.traced_credit(F.prefix_td(tokens, mask, R, gs, group_ids=gids), mask,
                                  DecayStyle("recent", gamma=1.0, lam=1.0))  # [B, T] (R_i - V_i(t)) / s
            got = F.turn_credit("prefix-turn", ids, tr, r, gs, group_ids=gids, tokens=tokens)
            want = torch.zeros_like(got)
            for i in range(ids.shape[0]):
                first = {}
                for t in range(ids.shape[1]):
                    k = int(ids[i, t])
                    if k >= 0:
                        first.setdefault(k, t)
                        want[i, t] = tok[i, first[k]]
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_prefix_turn_is_the_step_level_td_error_summed_per_turn():
    """The contract's construction, literally: boundary = the turns' last tokens, the step-level
    F.prefix_td, D = its sum over each turn, GAE over turns."""
    for seed in (0, 3):
        ids, tokens, tr, r, _ = _random_turns(seed=seed, vocab=2)
        B, K = tr.shape
        mask = ids >= 0
        R = F.turn_returns(ids, tr, r)[:, 0]  # [B]
        delta = F.prefix_td(tokens, mask, R, 4, boundary=F.turn_ends(ids))  # [B, T]
        rows = torch.arange(B)[:, None].expand_as(ids)[mask]
        D = torch.zeros(B, K, dtype=torch.float64).index_put_((rows, ids[mask]), delta[mask], accumulate=True)
        live = torch.arange(K) < ids.amax(1)[:, None] + 1  # [B, K]
        for gg, gl in ((1.0, 1.0), (0.9, 0.5)):
            A = torch.zeros(B, K + 1, dtype=torch.float64)
            for k in reversed(range(K)):
                A[:, k] = D[:, k] + gg * gl * A[:, k + 1]
            got = F.turn_credit("prefix-turn", ids, tr, r, 4, tokens=tokens, gae_gamma=gg, gae_lam=gl, per_turn=True)
            torch.testing.assert_close(got, A[:, :K] * live, rtol=1e-10, atol=1e-10)


def test_turn_grpo_without_turn_rewards_is_the_rloo_advantage_broadcast():
    ids, _, _, r, _ = _random_turns(seed=4)
    mask = ids >= 0
    for scale in ("std", "none"):
        got = F.turn_credit("turn-grpo", ids, None, r, 4, scale=scale)
        want = F.group_advantage(r, 4, baseline="loo", scale=scale)[:, None] * mask
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and with turn rewards it is the RLOO advantage of the totals
    _, _, tr, _, _ = _random_turns(seed=4)
    torch.testing.assert_close(F.turn_credit("turn-grpo", ids, tr, r, 4),
                               F.group_advantage(r + tr.sum(-1), 4, baseline="loo")[:, None] * mask)


def test_edge_cases_empty_batch_no_turns_groups_of_one():
    for kind in KINDS:
        kw = _kind_kwargs(kind, torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long))
        out = F.turn_credit(kind, torch.zeros(0, 5, dtype=torch.long), None, torch.zeros(0), 2, **kw)
        assert out.shape == (0, 5)
        ids = torch.full((4, 3), -1)  # no row has a turn
        kw = _kind_kwargs(kind, torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 0, dtype=torch.long))
        out = F.turn_credit(kind, ids, None, torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, **kw)
        assert torch.equal(out, torch.zeros(4, 3))
        assert F.turn_credit(kind, ids, None, None, 2, per_turn=True, **kw).shape == (4, 1)
        ids = torch.tensor([[0, 1], [0, 0]])
        kw = _kind_kwargs(kind, torch.tensor([[1, 2], [1, 3]]), torch.tensor([[0, 0], [0, 0]]))
        out = F.turn_credit(kind, ids, None, torch.tensor([1.0, 0.0]), 1, **kw)  # groups of one: no baseline
        assert torch.equal(out, torch.zeros(2, 2))
    assert F.turn_credit("turn-grpo", torch.tensor([[0]]), None, None, 1).dtype == torch.get_default_dtype()


# ============================================================================ bad input
def test_bad_inputs_name_the_argument_and_row():
    ids, tokens, tr, r, st = _random_turns(seed=0)
    bad = ids.clone()
    b = int((ids.amax(1) >= 1).nonzero()[1, 0])  # a row with two turns or more
    cols = (bad[b] >= 0).nonzero().flatten()
    bad[b, cols[-1]] = 0  # the last token of row b back in turn 0
    with pytest.raises(ValueError, match=rf"turn_ids must be non-decreasing .* row {b} has turn 0 at position "
                                         rf"{int(cols[-1])}"):
        F.turn_credit("turn-grpo", bad, tr, r, 4)
    with pytest.raises(ValueError, match=f"row {b}"):
        F.turn_ends(bad)
    bad = ids.clone()
    bad[3, 0] = -2
    with pytest.raises(ValueError, match="row 3, position 0 holds -2"):
        F.turn_returns(bad)
    tr2 = tr.clone()
    K1 = int(ids[1].max()) + 1  # row 1 has no tokens: K_1 = 0
    tr2[1, K1] = 1.0
    with pytest.raises(ValueError, match="rewards for turns row 1 does not have"):
        F.turn_credit("turn-index", ids, tr2, r, 4)
    with pytest.raises(ValueError, match=r"turn_rewards must have K >= max_i K_i"):
        F.turn_credit("turn-index", ids, tr[:, :2], r, 4)
    for s, match in ((st[:, :-1], "state_ids must have the width of turn_rewards"),
                     (st[:-1], "state_ids must be"), (st.float(), "integer"), (st[0], "2-D"),
                     (st - 5, "state_ids must be -1 .* row 0")):
        with pytest.raises(ValueError, match=match):
            F.turn_credit("anchor-state", ids, tr, r, 4, state_ids=s)
    with pytest.raises(ValueError, match="state_ids must have K >= max_i K_i"):
        F.turn_credit("anchor-state", ids, None, r, 4, state_ids=st[:, :2])
    r2 = r.clone()
    r2[3] = float("nan")
    with pytest.raises(ValueError, match=r"rewards must be finite: row 3"):
        F.turn_credit("turn-grpo", ids, tr, r2, 4)
    tr3 = tr.clone()
    tr3[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"turn_rewards must be finite: row 2, turn 0"):
        F.turn_returns(ids, tr3, r)
    mask = ids >= 0
    t = int((mask[4]).nonzero()[0, 0])
    mask[4, t] = False
    with pytest.raises(ValueError, match=rf"turn_ids and mask disagree at row 4, position {t}"):
        F.turn_credit("turn-grpo", ids, tr, r, 4, mask=mask)
    with pytest.raises(ValueError, match=r"kind must be one of \('turn-grpo', 'turn-index', 'anchor-state', "
                                         r"'prefix-turn'\), got 'gigpo'"):
        F.turn_credit("gigpo", ids, tr, r, 4)
    with pytest.raises(ValueError, match="kind='anchor-state' needs state_ids"):
        F.turn_credit("anchor-state", ids, tr, r, 4)
    with pytest.raises(ValueError, match="state_ids applies to kind='anchor-state' only"):
        F.turn_credit("turn-index", ids, tr, r, 4, state_ids=st)
    with pytest.raises(ValueError, match="kind='prefix-turn' needs tokens"):
        F.turn_credit("prefix-turn", ids, tr, r, 4)
    with pytest.raises(ValueError, match="needs gamma = 1"):
        F.turn_credit("prefix-turn", ids, tr, r, 4, tokens=tokens, gamma=0.9)
    with pytest.raises(ValueError, match="tokens applies to kind='prefix-turn' only"):
        F.turn_credit("turn-grpo", ids, tr, r, 4, tokens=tokens)
    with pytest.raises(ValueError, match="exactly one of group_size or group_ids"):
        F.turn_credit("turn-grpo", ids, tr, r)
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        F.turn_credit("turn-grpo", ids, tr, r, 5)
    for kw, match in ((dict(gamma=1.5), "gamma"), (dict(omega=-1.0), "omega"), (dict(gae_lam=2.0), "gae_lam"),
                      (dict(scale="mad"), "scale"), (dict(eps=-1.0), "eps")):
        with pytest.raises(ValueError, match=match):
            F.turn_credit("turn-grpo", ids, tr, r, 4, **kw)
    with pytest.raises(ValueError, match="turn_ids must be an integer"):
        F.turn_credit("turn-grpo", ids.float(), tr, r, 4)
    with pytest.raises(ValueError, match="give turn_ids"):
        F.turn_credit("turn-grpo", None, tr, r, 4)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at N"):
        F.turn_credit("turn-grpo", ids.reshape(-1), None, r, 4, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="tokens shape"):
        F.turn_credit("prefix-turn", ids, tr, r, 4, tokens=tokens[:, :-1])


# ============================================================================ registry
def _turn_batch(seed=0):
    ids, tokens, tr, r, st = _random_turns(seed=seed, id_gaps=False)
    return ids, ids >= 0, tokens, tr.float(), r.float(), st


def test_registry_kinds_methods_and_options():
    assert ADVANTAGES[-4:] == ("turn_grpo", "turn_index", "anchor_state", "prefix_turn")
    names = list_credits()  # (other tests may register methods of their own after the built-ins)
    turn = ["turn-grpo", "turn-index", "anchor-state", "prefix-turn"]
    assert [names.index(n) for n in turn] == sorted(names.index(n) for n in turn)
    for name in ("turn-grpo", "turn-index", "anchor-state", "prefix-turn"):
        m = get_credit(name)
        assert m.per_token and m.turns and m.description and (m.turn_gamma, m.omega) == (1.0, 1.0)
        assert m.needs_states == (name == "anchor-state") and m.needs_tokens == (name == "prefix-turn")
    assert not get_credit("grpo").turns and not get_credit("prefix-gae").needs_states
    pt = get_credit("prefix-turn")
    assert (pt.gae_gamma, pt.gae_lam) == (1.0, 1.0)
    assert get_credit("anchor-state").summary() == ("anchor-state: advantage=anchor_state, scale=std, turn_gamma=1, "
                                                    "omega=1")
    assert "turn_gamma=0.9" in CreditMethod("x", advantage="turn_index", turn_gamma=0.9).summary()
    assert "turn_gamma" not in get_credit("prefix-turn").summary() and "omega" not in get_credit("grpo").summary()
    for kw, match in ((dict(omega=0.5), "omega=0.5 applies to advantage='anchor_state' only, not advantage='group'"),
                      (dict(advantage="turn_grpo", omega=0.5), "omega=0.5 applies to advantage='anchor_state'"),
                      (dict(advantage="prefix_turn", turn_gamma=0.9), r"turn_gamma=0.9 applies to the advantage "
                                                                      r"kinds \['turn_grpo', 'turn_index', "
                                                                      r"'anchor_state'\] only"),
                      (dict(advantage="turn_index", turn_gamma=1.5), "turn_gamma must be in"),
                      (dict(advantage="anchor_state", omega=-1.0), "omega must be a finite float >= 0"),
                      (dict(advantage="anchor_state", omega=float("nan")), "omega"),
                      (dict(advantage="turn_index", baseline="loo"), "baseline='loo' applies to")):
        with pytest.raises(ValueError, match=match):
            CreditMethod("x", **kw)
    m = get_credit("anchor-state").replace(name="a2", omega=0.25, turn_gamma=0.5)
    assert (m.omega, m.turn_gamma) == (0.25, 0.5) and get_credit("anchor-state").omega == 1.0


def test_registry_anchor_state_with_and_without_state_ids():
    ids, mask, tokens, tr, r, st = _turn_batch()
    m = get_credit("anchor-state")
    adv = m.advantages(r, mask, group_size=4, turn_ids=ids, turn_rewards=tr, state_ids=st)  # [B, T]
    want = F.turn_credit("anchor-state", ids, tr, r, 4, state_ids=st, mask=mask)
    assert adv.shape == mask.shape and adv.dtype == torch.float32
    torch.testing.assert_close(adv, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="credit method 'anchor-state' needs state_ids: "):
        m.advantages(r, mask, group_size=4, turn_ids=ids, turn_rewards=tr)
    # options reach the function; the clamp applies after
    m2 = CreditMethod("a3", advantage="anchor_state", turn_gamma=0.8, omega=0.3, clamp_min=-0.2)
    got = m2.advantages(r, mask, group_ids=torch.arange(12) // 3, turn_ids=ids, turn_rewards=tr, state_ids=st)
    raw = F.turn_credit("anchor-state", ids, tr, r, group_ids=torch.arange(12) // 3, state_ids=st, gamma=0.8,
                        omega=0.3)
    torch.testing.assert_close(got, raw.clamp_min(-0.2))
    assert bool((raw < -0.2).any())


@pytest.mark.parametrize("name", ["turn-grpo", "turn-index", "prefix-turn"])
def test_registry_turn_methods_equal_the_function(name):
    ids, mask, tokens, tr, r, st = _turn_batch(seed=3)
    m = get_credit(name)
    kind = name
    tok = tokens if name == "prefix-turn" else None
    got = m.advantages(r, mask, tokens=tokens, group_size=4, turn_ids=ids, turn_rewards=tr)
    torch.testing.assert_close(got, F.turn_credit(kind, ids, tr, r, 4, tokens=tok, mask=mask), rtol=0, atol=0)
    # no turn_ids: the runs of valid tokens; with boundary: also a new turn after each boundary token
    runs = F.turn_ids_from_mask(mask)
    torch.testing.assert_close(m.advantages(r, mask, tokens=tokens, group_size=4),
                               F.turn_credit(kind, runs, None, r, 4, tokens=tok))
    boundary = (tokens == 0) & mask
    steps = F.turn_ids_from_mask(mask, boundary)
    trs = torch.rand(12, int(steps.max()) + 1) * (torch.arange(int(steps.max()) + 1) < steps.amax(1)[:, None] + 1)
    torch.testing.assert_close(m.advantages(r, mask, tokens=tokens, group_size=4, boundary=boundary, turn_rewards=trs),
                               F.turn_credit(kind, steps, trs, r, 4, tokens=tok))
    with pytest.raises(ValueError, match="not both"):
        m.advantages(r, mask, tokens=tokens, group_size=4, boundary=boundary, turn_ids=runs)
    with pytest.raises(ValueError, match="disagree"):
        m.advantages(r, ~mask, tokens=tokens, group_size=4, turn_ids=ids)


def test_non_turn_methods_see_the_total_rewards():
    ids, mask, tokens, tr, r, st = _turn_batch(seed=6)
    total = r + tr.sum(-1)  # [B] undiscounted
    for name in ("grpo", "clamp", "prefix-gae", "prefix-gae-lambda", "treerl"):
        m = get_credit(name)
        kw = dict(tokens=tokens) if m.needs_tokens else {}
        msk = mask if m.needs_mask else None
        got = m.advantages(r, msk, group_size=4, turn_rewards=tr, **kw)
        torch.testing.assert_close(got, m.advantages(total, msk, group_size=4, **kw), rtol=1e-6, atol=1e-6)
        # turn_ids too: checked against the mask and the rewards' turns, same totals
        torch.testing.assert_close(m.advantages(r, msk, group_size=4, turn_rewards=tr, turn_ids=ids, **kw), got)
        with pytest.raises(ValueError, match="state_ids applies to the turn kinds"):
            m.advantages(r, msk, group_size=4, turn_rewards=tr, state_ids=st, **kw)
    tr2 = tr.clone()
    row = int((ids.amax(1) + 1 < tr.shape[1]).nonzero()[0, 0])
    tr2[row, -1] = 1.0
    with pytest.raises(ValueError, match=f"rewards for turns row {row} does not have"):
        get_credit("grpo").advantages(r, group_size=4, turn_rewards=tr2, turn_ids=ids)
    with pytest.raises(ValueError, match="turn_rewards must be finite: row 0"):
        get_credit("grpo").advantages(r, group_size=4, turn_rewards=tr.fill_(float("nan")))


# ============================================================================ TensorDict modules
def test_credit_pipeline_reads_turn_keys():
    TensorDict = pytest.importorskip("tensordict").TensorDict
    from creditlib import modules as M

    ids, mask, tokens, tr, r, st = _turn_batch(seed=8)
    B = ids.shape[0]
    td = TensorDict(tokens=tokens, mask=mask.long().unsqueeze(-1), reward=r.unsqueeze(-1), turn_ids=ids.unsqueeze(-1),
                    turn_rewards=tr, states=st, batch_size=[B])
    keys = dict(turn_ids_key="turn_ids", turn_rewards_key="turn_rewards")
    for name in ("turn-grpo", "turn-index", "anchor-state", "prefix-turn", "grpo", "prefix-gae-clamp"):
        m = get_credit(name)
        sk = dict(state_ids_key="states") if m.needs_states else {}
        pipe = M.credit_pipeline(name, group_size=4, **keys, **sk)
        assert type(pipe.module[0]).__name__ == "CreditAdvantage"
        assert "turn_ids" in pipe.module[0].in_keys and ("states" in pipe.module[0].in_keys) == m.needs_states
        out = pipe(td.clone())["advantage"]
        want = m.advantages(r, mask, tokens=tokens, group_size=4, turn_ids=ids, turn_rewards=tr,
                            state_ids=st if m.needs_states else None)
        torch.testing.assert_close(out.reshape(want.shape), want, rtol=0, atol=0)
    out = M.credit_pipeline("turn-index", group_size=4, keepdim=True)(td.clone())["advantage"]  # no keys: runs
    torch.testing.assert_close(out.squeeze(-1), get_credit("turn-index").advantages(r, mask, group_size=4))
    with pytest.raises(ValueError, match="state_ids_key applies to the turn kinds"):
        M.credit_pipeline("grpo", group_size=4, state_ids_key="states")
    with pytest.raises(ValueError, match="credit method 'anchor-state' needs state_ids"):
        M.credit_pipeline("anchor-state", group_size=4, **keys)(td.clone())
    with pytest.raises(ValueError, match="turn rewards"):
        td2 = td.clone()
        td2["turn_rewards"] = tr[:, :, None, None].expand(B, tr.shape[1], 2, 1).clone()
        M.credit_pipeline("turn-index", group_size=4, **keys)(td2)


def test_turn_ids_from_mask_reads_any_nonzero_byte_as_valid():
    m8 = torch.tensor([[0, 2, 7, 0, 1, 255], [3, 0, 0, 9, 9, 0]], dtype=torch.uint8)
    b8 = torch.tensor([[0, 0, 5, 0, 0, 0], [0, 0, 0, 4, 0, 0]], dtype=torch.uint8)
    want = torch.tensor([[-1, 0, 0, -1, 1, 1], [0, -1, -1, 1, 2, -1]])
    assert torch.equal(F.turn_ids_from_mask(m8.view(torch.bool), b8.view(torch.bool)), want)
    assert torch.equal(F.turn_ids_from_mask(m8, b8), want)
    with pytest.raises(ValueError, match=r"mask must be a bool or integer"):
        F.turn_ids_from_mask(m8.float())
    with pytest.raises(ValueError, match="boundary shape"):
        F.turn_ids_from_mask(m8, b8[:, :-1])
