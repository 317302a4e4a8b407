"""F.prefix_td (group prefix-tree TD error, leave-one-out) held against the trie-walk definition.

The fast form (creditlib/ops/prefix/vectorised.py) is compared with creditlib/ops/prefix/naive.py on random
groups built to share prefixes (small vocabularies, copied prefixes, identical completions, one a
prefix of another), every mask pattern, group_ids in any order, and both scales; plus the
properties docs/design.md (section 4) states: row sums are the RLOO advantage, GAE(1, 1) over it is
(R_i - V_i(k)) / s, pushes of a shared state sum to zero, and the step-level variant.
"""

import math

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.ops.prefix.vectorised import _first_mismatch
from creditlib.ops.prefix.naive import prefix_td_naive, prefix_values_naive

MASKS = ("full", "right", "left", "multi", "empty-rows")


def _group_tokens(gen, G, T, vocab):
    """[G, T] completions of one prompt that share prefixes: each copies a random earlier one up to
    a random cut (sometimes all of it: identical completions), then continues at random."""
    tok = torch.randint(0, vocab, (G, T), generator=gen)  # [G, T]
    for i in range(1, G):
        j = int(torch.randint(0, i, (1,), generator=gen))
        u = float(torch.rand(1, generator=gen))
        cut = T if u < 0.2 else int(torch.randint(0, T + 1, (1,), generator=gen))
        tok[i, :cut] = tok[j, :cut]
    return tok


def _mask(gen, kind, B, T):
    ar = torch.arange(T)[None, :]  # [1, T]
    lens = torch.randint(0, T + 1, (B, 1), generator=gen)  # [B, 1]
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        return ar < lens
    if kind == "left":
        return ar >= T - lens
    if kind == "multi":
        return torch.rand(B, T, generator=gen) < 0.7
    m = ar < lens  # empty-rows: right padding with some rows fully masked
    m[torch.rand(B, generator=gen) < 0.3] = False
    return m


def _case(seed, G, K, T, vocab, mask_kind, binary=True):
    gen = torch.Generator().manual_seed(seed)
    tok = torch.cat([_group_tokens(gen, G, T, vocab) for _ in range(K)])  # [B, T]
    B = G * K
    mask = _mask(gen, mask_kind, B, T)  # [B, T]
    if mask_kind == "left" and T > 0:
        # left padding: keep the shared prefixes aligned on the first valid token
        lens = mask.sum(1)
        tok = torch.stack([torch.cat([tok[b, int(lens[b]):], tok[b, :int(lens[b])]]) for b in range(B)]) \
            if B else tok
    tok = torch.where(mask, tok, torch.full_like(tok, -7))  # masked token ids are never read
    if binary:
        r = torch.randint(0, 2, (B,), generator=gen).to(torch.float64)  # [B]
    else:
        r = torch.randn(B, generator=gen, dtype=torch.float64)  # [B]
    return tok, mask, r


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("scale", ["std", "none"])
def test_matches_trie_walk(mask_kind, scale):
    for seed in range(24):
        G = [1, 2, 3, 4, 8][seed % 5]
        K = 1 + seed % 3
        T = [1, 5, 8, 13, 24, 31][seed % 6]
        vocab = 2 + seed % 2
        tok, mask, r = _case(1000 * seed + 7, G, K, T, vocab, mask_kind, binary=seed % 2 == 0)
        got = F.prefix_td(tok, mask, r, G, scale=scale)
        want = prefix_td_naive(tok, mask, r, G, scale=scale)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert got.dtype == torch.float64
        assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("mask_kind", MASKS)
def test_group_ids_any_order_and_sizes(mask_kind):
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        sizes = torch.randint(1, 6, (4,), generator=gen).tolist()  # varied group sizes, some of one
        T = [3, 9, 16, 21][seed % 4]
        parts = [_group_tokens(gen, g, T, 2) for g in sizes]
        tok = torch.cat(parts)  # [B, T]
        B = tok.shape[0]
        ids = torch.cat([torch.full((g,), 10 * k + 3) for k, g in enumerate(sizes)])  # [B]
        perm = torch.randperm(B, generator=gen)  # groups interleaved in any order
        tok, ids = tok[perm], ids[perm]
        mask = _mask(gen, mask_kind, B, T)
        r = torch.randn(B, generator=gen, dtype=torch.float64)
        for scale in ("std", "none"):
            got = F.prefix_td(tok, mask, r, group_ids=ids, scale=scale)
            want = prefix_td_naive(tok, mask, r, group_ids=ids, scale=scale)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # shuffled group_ids give the rows of the same batch in group order with group_size
    ids = torch.tensor([2, 0, 2, 1, 0, 1])
    tok = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]])
    mask = torch.ones(6, 3, dtype=torch.bool)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    order = torch.argsort(ids, stable=True)
    by_ids = F.prefix_td(tok, mask, r, group_ids=ids)
    by_size = F.prefix_td(tok[order], mask[order], r[order], 2)
    torch.testing.assert_close(by_ids[order], by_size, rtol=0, atol=0)


def test_edge_groups():
    # identical completions; one a prefix of another; a group of one; an all-masked row
    tok = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 0, 0], [1, 2, 3, 4],
                        [5, 6, 7, 8], [0, 0, 0, 0], [5, 6, 7, 8], [5, 9, 9, 9]])  # [8, 4]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                         [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    for scale in ("std", "none"):
        got = F.prefix_td(tok, mask, r, 4, scale=scale)
        torch.testing.assert_close(got, prefix_td_naive(tok, mask, r, 4, scale=scale), rtol=0, atol=1e-12)
    got = F.prefix_td(tok, mask, r, 4, scale="none")
    # row 1 (identical to row 0, reward 0): its others are rows 0, 2, 3 up to depth 2 (row 2 ends
    # there), then rows 0 and 3: V(0..3) = 2/3, 2/3, 2/3, 1/2 and V(4) = R_1 = 0
    torch.testing.assert_close(got[1], torch.tensor([0.0, 0.0, -1 / 6, -0.5], dtype=torch.float64))
    assert got[5].abs().sum() == 0  # an all-masked row gets nothing
    one = F.prefix_td(tok[:1], mask[:1], r[:1], 1)  # groups of one get 0
    assert one.abs().sum() == 0
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])  # group 1 has a single member
    got = F.prefix_td(tok, mask, r, group_ids=ids)
    assert got[2].abs().sum() == 0
    torch.testing.assert_close(got, prefix_td_naive(tok, mask, r, group_ids=ids), rtol=0, atol=1e-12)


def test_equal_rewards_and_zero_eps():
    tok, mask, _ = _case(5, 4, 3, 10, 2, "right")
    r = torch.ones(12, dtype=torch.float64)  # every value equals 1: no TD error, never NaN
    for eps in (0.0, 1e-4):
        got = F.prefix_td(tok, mask, r, 4, eps=eps)
        assert bool(torch.isfinite(got).all()) and got.abs().max() == 0


@pytest.mark.parametrize("mask_kind", ["right", "left", "multi"])
def test_rows_sum_to_rloo(mask_kind):
    for seed in range(6):
        G = [2, 4, 8][seed % 3]
        tok, mask, r = _case(seed, G, 4, 40, 3, mask_kind, binary=seed % 2 == 0)
        for scale in ("std", "none"):
            d = F.prefix_td(tok, mask, r, G, scale=scale)
            rloo = F.group_advantage(r, G, scale=scale, baseline="loo")  # same std + 1e-4 convention
            has = mask.any(1)  # rows without valid tokens carry no credit (their sum is 0)
            torch.testing.assert_close(d.sum(1)[has], rloo[has], rtol=0, atol=1e-12)
            assert bool((d.sum(1)[~has] == 0).all())


@pytest.mark.parametrize("mask_kind", ["right", "left", "multi"])
def test_gae_composition(mask_kind):
    """GAE(1, 1) over prefix_td gives token k (R_i - V_i(k)) / s; GAE(gamma, lam) equals the plain
    discounted sum of the TD errors over the valid tokens."""
    G = 4
    tok, mask, r = _case(11, G, 3, 30, 2, mask_kind)
    d = F.prefix_td(tok, mask, r, G)  # [B, T]
    gae = F.traced_credit(d, mask, DecayStyle("recent", gamma=1.0, lam=1.0))  # [B, T]
    V = prefix_values_naive(tok, mask, r, G)  # [B, T]
    s = torch.tensor([r[k * G:(k + 1) * G].std().item() + 1e-4 for k in range(3)],
                     dtype=torch.float64).repeat_interleave(G)  # [B]
    want = torch.where(mask, (r[:, None] - V) / s[:, None], torch.zeros_like(V))
    torch.testing.assert_close(gae, want, rtol=0, atol=1e-10)
    gamma, lam = 0.9, 0.8
    gae = F.traced_credit(d, mask, DecayStyle("recent", gamma=gamma, lam=lam))
    want = torch.zeros_like(d)
    for b in range(d.shape[0]):
        cols = mask[b].nonzero().squeeze(1).tolist()
        acc = 0.0
        for c in reversed(cols):
            acc = float(d[b, c]) + gamma * lam * acc
            want[b, c] = acc
    torch.testing.assert_close(gae, want, rtol=0, atol=1e-10)


def test_shared_state_pushes_sum_to_zero():
    """While every member of a group is on the same prefix and takes the same next token, the GAE(1, 1)
    credits of that token over the group sum to exactly 0 (no noise on shared tokens)."""
    gen = torch.Generator().manual_seed(3)
    G, P, T = 6, 9, 20
    tok = torch.randint(0, 50, (G, T), generator=gen)
    tok[:, :P] = tok[0, :P]  # a shared prefix of P tokens, then the completions part ways
    tok[1] = tok[0]  # and two of them are identical
    mask = torch.ones(G, T, dtype=torch.bool)
    mask[2, 15:] = False
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    gae = F.traced_credit(F.prefix_td(tok, mask, r, G), mask, DecayStyle("recent", gamma=1.0, lam=1.0))
    torch.testing.assert_close(gae[:, :P].sum(0), torch.zeros(P, dtype=torch.float64), rtol=0, atol=1e-12)
    assert gae[:, P].abs().sum() > 0  # where they part ways, credit is not zero
    # inside the tree: rows 0, 1, 3 go on together after the others leave at P; while they all
    # take the same next token their credits sum to zero again
    tok[3, :14] = tok[0, :14]
    gae = F.traced_credit(F.prefix_td(tok, mask, r, G), mask, DecayStyle("recent", gamma=1.0, lam=1.0))
    sub = gae[[0, 1, 3]]  # [3, T]
    torch.testing.assert_close(sub[:, P + 1:13].sum(0), torch.zeros(13 - P - 1, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # the same with left padding: positions count valid tokens only
    pad = torch.zeros(G, 4, dtype=torch.long)
    tl = torch.cat([pad, tok], 1)
    ml = torch.cat([torch.zeros(G, 4, dtype=torch.bool), mask], 1)
    gl = F.traced_credit(F.prefix_td(tl, ml, r, G), ml, DecayStyle("recent", gamma=1.0, lam=1.0))
    torch.testing.assert_close(gl[:, 4:], gae, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_step_level_matches_definition(mask_kind):
    for seed in range(12):
        G = [2, 3, 4, 8][seed % 4]
        T = [6, 13, 24][seed % 3]
        tok, mask, r = _case(77 + seed, G, 2, T, 3, mask_kind, binary=seed % 2 == 1)
        gen = torch.Generator().manual_seed(seed)
        boundary = torch.rand(tok.shape, generator=gen) < 0.25  # [B, T], also at masked positions
        for scale in ("std", "none"):
            got = F.prefix_td(tok, mask, r, G, scale=scale, boundary=boundary)
            want = prefix_td_naive(tok, mask, r, G, scale=scale, boundary=boundary)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        ids = torch.randint(0, 3, (tok.shape[0],), generator=gen)
        got = F.prefix_td(tok, mask, r, group_ids=ids, boundary=boundary)
        torch.testing.assert_close(got, prefix_td_naive(tok, mask, r, group_ids=ids, boundary=boundary),
                                   rtol=0, atol=1e-12)


def test_step_level_properties():
    G = 4
    tok, mask, r = _case(21, G, 3, 40, 2, "multi")
    allb = torch.ones_like(mask)
    torch.testing.assert_close(F.prefix_td(tok, mask, r, G, boundary=allb), F.prefix_td(tok, mask, r, G),
                               rtol=0, atol=1e-12)
    # newline-like boundaries: token id 1 ends a step
    boundary = tok == 1
    d = F.prefix_td(tok, mask, r, G, boundary=boundary)
    gae = F.traced_credit(d, mask, DecayStyle("recent", gamma=1.0, lam=1.0))
    V = prefix_values_naive(tok, mask, r, G)
    for b in range(tok.shape[0]):
        cols = mask[b].nonzero().squeeze(1).tolist()
        s = r[(b // G) * G:(b // G + 1) * G].std().item() + 1e-4
        step_start = 0
        for k, c in enumerate(cols):
            if k > 0 and bool(boundary[b, cols[k - 1]]):
                step_start = k
            # every token of a step: (R_i - V_i(step start)) / s
            assert math.isclose(float(gae[b, c]), (float(r[b]) - float(V[b, cols[step_start]])) / s,
                                abs_tol=1e-9)
            # the TD error is nonzero only on the last token of a step
            last = k == len(cols) - 1 or bool(boundary[b, c])
            if not last:
                assert float(d[b, c]) == 0.0
        torch.testing.assert_close(d[b].sum(), F.group_advantage(r, G, baseline="loo")[b] if cols else
                                   torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)


def test_long_sequences():
    G, T = 4, 2600
    gen = torch.Generator().manual_seed(9)
    tok = _group_tokens(gen, G, T, 2)
    tok[1, :2000] = tok[0, :2000]  # long shared prefixes, mismatches inside 8-token words
    tok[2] = tok[0]
    tok[2, 1999] = 1 - tok[0, 1999]
    mask = torch.ones(G, T, dtype=torch.bool)
    mask[3, T - 17:] = False
    mask[0, :5] = False  # shifts row 0: its prefixes now differ from the others
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    multi = mask.clone()
    multi[:, 700:760] = False  # a masked-out turn in every row
    boundary = torch.zeros_like(mask)
    boundary[:, ::97] = True
    for m in (mask, torch.ones_like(mask), multi):
        torch.testing.assert_close(F.prefix_td(tok, m, r, G), prefix_td_naive(tok, m, r, G), rtol=0, atol=1e-12)
        torch.testing.assert_close(F.prefix_td(tok, m, r, G, boundary=boundary),
                                   prefix_td_naive(tok, m, r, G, boundary=boundary), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    tok, mask, r = _case(4, 4, 2, 17, 2, "multi", binary=False)
    got = F.prefix_td(tok, mask, r.to(dtype), 4)
    assert got.dtype == dtype
    want = prefix_td_naive(tok, mask, r.to(dtype).double(), 4)  # computed in float64, then rounded once
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_token_dtypes(tdtype):
    tok, mask, r = _case(8, 4, 2, 19, 3, "left")
    want = prefix_td_naive(tok.clamp_min(0), mask, r, 4)
    torch.testing.assert_close(F.prefix_td(tok.clamp_min(0).to(tdtype), mask, r, 4), want, rtol=0, atol=1e-12)
    # ids beyond int32 and negative ids are compared exactly
    big = tok.clamp_min(0) * (2 ** 40) - 3
    torch.testing.assert_close(F.prefix_td(big, mask, r, 4), prefix_td_naive(big, mask, r, 4), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["right", "left", "multi"])
def test_non_contiguous_inputs(mask_kind):
    tok, mask, r = _case(15, 4, 2, 32, 2, mask_kind)
    tok2 = torch.stack([tok, tok], -1)[..., 0]  # [B, T] strided views
    mask2 = torch.stack([mask, mask], -1)[..., 1]
    bnd = torch.stack([tok == 1, tok == 0], -1)[..., 0]
    assert not tok2.is_contiguous() and not mask2.is_contiguous()
    # contiguous views at odd storage offsets (a bool mask cut out of a larger buffer)
    B, T = mask.shape
    buf = torch.zeros(B * T + 3, dtype=torch.bool)
    buf[3:] = mask.reshape(-1)
    odd = buf[3:].view(B, T)
    assert odd.is_contiguous() and odd.storage_offset() == 3
    torch.testing.assert_close(F.prefix_td(tok, odd, r, 4), prefix_td_naive(tok, mask, r, 4), rtol=0, atol=1e-12)
    for b in (None, bnd):
        torch.testing.assert_close(F.prefix_td(tok2, mask2, r, 4, boundary=b),
                                   prefix_td_naive(tok, mask, r, 4, boundary=tok == 1 if b is not None else None),
                                   rtol=0, atol=1e-12)


def test_not_differentiable_and_empty():
    tok, mask, r = _case(2, 2, 2, 8, 2, "right", binary=False)
    rg = r.clone().requires_grad_(True)
    out = F.prefix_td(tok, mask, rg, 2)
    assert not out.requires_grad
    assert F.prefix_td(tok[:0], mask[:0], r[:0], 2).shape == (0, 8)
    assert F.prefix_td(tok[:, :0], mask[:, :0], r, 2).shape == (4, 0)
    assert F.prefix_td(tok[:0], mask[:0], r[:0], group_ids=torch.zeros(0, dtype=torch.long)).shape == (0, 8)


def test_pair_buffer_in_pieces(monkeypatch):
    """Large groups compare their pairs in several buffers (bounded memory): same result."""
    import creditlib.ops.prefix.vectorised as P

    tok, mask, r = _case(13, 8, 2, 23, 2, "multi")
    ids = torch.tensor([0, 1] * 8)
    want = prefix_td_naive(tok, mask, r, 8)
    want_ids = prefix_td_naive(tok, mask, r, group_ids=ids)
    for budget in (1, 2 * 8 * 24 * 3):  # one offset per buffer; three offsets per buffer
        monkeypatch.setattr(P, "_NE_BUDGET", budget)
        torch.testing.assert_close(F.prefix_td(tok, mask, r, 8), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(F.prefix_td(tok, mask, r, group_ids=ids), want_ids, rtol=0, atol=1e-12)


def test_mask_bytes_other_than_one():
    """A bool mask viewed from uint8 may hold bytes other than 0 and 1: any nonzero byte is valid."""
    tok, mask, r = _case(6, 4, 2, 21, 2, "multi")
    odd = (mask.to(torch.uint8) * torch.randint(1, 255, mask.shape, dtype=torch.uint8)).view(torch.bool)
    for bnd in (None, tok == 1):
        torch.testing.assert_close(F.prefix_td(tok, odd, r, 4, boundary=bnd),
                                   F.prefix_td(tok, mask, r, 4, boundary=bnd), rtol=0, atol=0)


def test_first_mismatch_every_byte():
    """The int64-word reading of the mismatch bytes against a plain loop: a first mismatch at every
    position of a 40-wide row, and none."""
    W = 40
    ne = torch.zeros(W + 1, W, dtype=torch.bool)  # [W + 1, W]
    for p in range(W):
        ne[p, p] = True
        ne[p, p + 1:] = torch.rand(W - p - 1) < 0.5
    got = _first_mismatch(ne.contiguous())
    want = torch.tensor([next((i for i in range(W) if ne[p, i]), W) for p in range(W + 1)])
    torch.testing.assert_close(got, want)


def _bad(**kw):
    tok = torch.tensor([[1, 2, 3], [1, 2, 4]])
    args = dict(tokens=tok, mask=torch.ones(2, 3, dtype=torch.bool), rewards=torch.tensor([1.0, 0.0]),
                group_size=2)
    args.update(kw)
    tokens, mask, rewards = args.pop("tokens"), args.pop("mask"), args.pop("rewards")
    return F.prefix_td(tokens, mask, rewards, **args)


@pytest.mark.parametrize("kw,match", [
    (dict(tokens=torch.ones(2, 3)), "tokens"),
    (dict(tokens=[[1, 2, 3], [1, 2, 4]]), "tokens"),
    (dict(tokens=torch.ones(2, 3, dtype=torch.bool)), "tokens"),
    (dict(tokens=torch.ones(2, 3, 1, dtype=torch.long)), "tokens"),
    (dict(mask=torch.ones(2, 3)), "mask"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    (dict(rewards=torch.tensor([1, 0])), "rewards"),
    (dict(rewards=torch.tensor([1.0, 0.0, 1.0])), "rewards"),
    (dict(rewards=torch.tensor([1.0, float("nan")])), r"rewards\[1\]"),
    (dict(rewards=torch.tensor([float("inf"), 0.0])), r"rewards\[0\]"),
    (dict(group_size=3), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=True), "group_size"),
    (dict(group_size=2.0), "group_size"),
    (dict(group_size=None), "group_size or group_ids"),
    (dict(group_ids=torch.tensor([0, 0])), "group_size or group_ids"),
    (dict(group_size=None, group_ids=torch.tensor([0.0, 0.0])), "group_ids"),
    (dict(group_size=None, group_ids=torch.tensor([0, 0, 1])), "group_ids"),
    (dict(scale="mean"), "scale"),
    (dict(eps=-1e-3), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(boundary=torch.ones(2, 3)), "boundary"),
    (dict(boundary=torch.ones(2, 2, dtype=torch.bool)), "boundary"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)
