"""Tree rollouts (issue 19): TreeSpec, the batched sampler against its plain definition, the tree's
shape, copied old log-probs, fairness of the continuations (chi-square), too-short leaves, bad
input, prefix_td on the rows, and the transformers backend on a tiny Qwen2."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from creditlib import functional as F  # noqa: E402
from creditlib.rl.tree import (CallableBackend, TransformersBackend, TreeSpec, sample_tree,  # noqa: E402
                               select_forks)
from creditlib.rl.tree_reference import sample_tree_reference, select_forks_reference  # noqa: E402
from creditlib.style import DecayStyle  # noqa: E402

EOS = 0
V = 6


def _markov(seed=0, V=V, scale=1.5, eos_bias=0.0, temperature=0.8):
    """A first-order Markov policy: next-token logits = table[last token] (known distribution)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g, dtype=torch.float64) * scale  # [V, V]
    table[:, EOS] += eos_bias
    be = CallableBackend(lambda seqs: table[[s[-1] for s in seqs]], [EOS], temperature=temperature)
    return be, table


def _prompts():
    ids = torch.tensor([[0, 0, 3, 4], [5, 1, 2, 3], [0, 2, 4, 1]])  # [K, P] left padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])  # [K, P]
    return ids, mask


def _rows(tr):
    return [tr.completion_ids[i, :int(tr.completion_mask[i].sum())].tolist() for i in range(tr.batch_size)]


# ----------------------------------------------------------------------------- the spec
def test_spec_leaves_formula():
    for M, N, Bf, D in [(2, 1, 3, 1), (1, 2, 2, 2), (3, 1, 1, 0), (1, 1, 7, 1), (2, 3, 1, 2)]:
        s = TreeSpec(roots=M, forks=N, branches=Bf, depth=D)
        assert s.leaves == M * sum((N * Bf) ** d for d in range(D + 1))
    assert TreeSpec().leaves == 8  # the default tree: 2 roots x 1 fork x 3 branches
    assert TreeSpec().check_group_size(8) == 8


@pytest.mark.parametrize("kw,name", [
    (dict(roots=0), "roots"), (dict(forks=-1), "forks"), (dict(branches=0), "branches"),
    (dict(depth=-1), "depth"), (dict(min_gap=0), "min_gap"), (dict(roots=True), "roots"),
    (dict(branches=2.0), "branches"), (dict(select="random"), "select"), (dict(select=None), "select"),
    (dict(select="segment", segment_len=1, min_gap=2), "segment_len"),
])
def test_spec_bad_input(kw, name):
    with pytest.raises(ValueError, match=name):
        TreeSpec(**kw)


def test_group_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"num_generations=6 .*8 leaves"):
        TreeSpec().check_group_size(6, "num_generations")
    be, _ = _markov()
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="group_size=4"):
        sample_tree(be, ids, mask, TreeSpec(), max_new_tokens=8, seed=0, group_size=4)
    with pytest.raises(ValueError, match="group_size=4"):
        sample_tree_reference(be, ids, mask, TreeSpec(), max_new_tokens=8, seed=0, group_size=4)
    tr = sample_tree(be, ids, mask, TreeSpec(), max_new_tokens=8, seed=0, group_size=8)
    assert tr.batch_size == 3 * 8


def test_sampler_bad_input():
    be, _ = _markov()
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="spec"):
        sample_tree(be, ids, mask, (2, 1, 3, 1), max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_tree(be, ids, mask, TreeSpec(), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 0"):
        sample_tree(be, ids, torch.zeros_like(mask), TreeSpec(), max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt_mask"):
        sample_tree(be, ids, mask[:, 1:], TreeSpec(), max_new_tokens=8)
    with pytest.raises(ValueError, match="backend"):
        sample_tree(object(), ids, mask, TreeSpec(), max_new_tokens=8)
    with pytest.raises(ValueError, match="seed"):
        sample_tree(be, ids, mask, TreeSpec(), max_new_tokens=8, seed=1.5)
    with pytest.raises(ValueError, match="temperature"):
        CallableBackend(lambda s: None, [EOS], temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens\\[1\\]"):
        be.sample([[1], [2]], [3, 0], [0, 1])


# ----------------------------------------------------------------------------- batched == plain
@pytest.mark.parametrize("select", ["entropy", "uniform", "segment"])
def test_batched_sampler_equals_plain_definition(select):
    be, _ = _markov(seed=1)
    ids, mask = _prompts()
    spec = TreeSpec(roots=2, forks=2, branches=2, depth=2, select=select, min_gap=2, segment_len=3)
    a = sample_tree(be, ids, mask, spec, max_new_tokens=10, seed=7)
    b = sample_tree_reference(be, ids, mask, spec, max_new_tokens=10, seed=7)
    for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logprobs", "entropies",
              "group_ids", "parent", "fork_pos", "depth"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.fallback == b.fallback
    # another seed gives another tree
    c = sample_tree(be, ids, mask, spec, max_new_tokens=10, seed=8)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_fork_selection_equals_plain_rule():
    g = torch.Generator().manual_seed(3)
    for select in ("entropy", "uniform", "segment"):
        for N, gap in ((1, 1), (3, 2), (4, 3)):
            spec = TreeSpec(forks=N, select=select, min_gap=gap, segment_len=max(gap, 2))
            R, T = 40, 12
            ent = torch.rand(R, T, generator=g).round(decimals=1)  # [R, T] ties included
            keys = torch.rand(R, T, generator=g)  # [R, T]
            lens = torch.randint(1, T + 1, (R,), generator=g)  # [R]
            starts = (torch.rand(R, generator=g) * lens).long()  # [R] < len
            pos, stage = select_forks(ent, starts, lens, spec, keys)
            for r in range(R):
                p, s = select_forks_reference(ent[r].tolist(), int(starts[r]), int(lens[r]), spec, keys[r].tolist())
                assert pos[r].tolist() == p and stage[r].tolist() == s, (select, N, gap, r)


def test_entropy_forks_pick_the_highest_entropy_positions():
    ent = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.7, 0.95, 0.3]])  # [1, 7]
    pos, stage = select_forks(ent, torch.tensor([0]), torch.tensor([7]), TreeSpec(forks=2, min_gap=2))
    # allowed 2 <= k <= 5; 5 (0.95) first, then 2 (0.8): 4 is too close to 5
    assert pos.tolist() == [[5, 2]] and stage.tolist() == [[0, 0]]
    pos, _ = select_forks(ent, torch.tensor([0]), torch.tensor([7]), TreeSpec(forks=2, min_gap=1))
    assert pos.tolist() == [[5, 1]]


# ----------------------------------------------------------------------------- the tree's shape
def test_tree_shape_shared_prefixes_and_token_counts():
    be, table = _markov(seed=2, eos_bias=-1.0)
    ids, mask = _prompts()
    spec = TreeSpec(roots=2, forks=2, branches=2, depth=2, min_gap=2)
    tr = sample_tree(be, ids, mask, spec, max_new_tokens=12, seed=11)
    L = spec.leaves
    assert tr.batch_size == 3 * L and tr.group_size == L
    assert torch.equal(tr.group_ids, torch.arange(3).repeat_interleave(L))
    rows = _rows(tr)
    for d in range(spec.depth + 1):  # leaves made per round: M (N Bf)^d per prompt
        assert int((tr.depth == d).sum()) == 3 * spec.roots * (spec.forks * spec.branches) ** d
    for i in range(tr.batch_size):
        p, k = int(tr.parent[i]), int(tr.fork_pos[i])
        if p < 0:
            assert k == 0 and int(tr.depth[i]) == 0
            continue
        assert int(tr.group_ids[p]) == int(tr.group_ids[i]) and int(tr.depth[p]) == int(tr.depth[i]) - 1
        assert rows[i][:k] == rows[p][:k]  # the shared prefix is the parent's tokens up to the fork
        assert torch.equal(tr.old_logprobs[i, :k], tr.old_logprobs[p, :k])  # copied from the parent
        assert torch.equal(tr.entropies[i, :k], tr.entropies[p, :k])
        assert k >= int(tr.fork_pos[p]) and k <= len(rows[p]) - 1
        assert len(rows[i]) <= 12 and len(rows[i]) > k
    n = tr.completion_mask.sum(1)  # [B]
    assert tr.row_tokens == int(n.sum())
    assert tr.generated_tokens == int((n - tr.fork_pos).sum()) < tr.row_tokens
    # rows end at the first EOS or at the cap; nothing after
    for r in rows:
        assert EOS not in r[:-1] and (r[-1] == EOS or len(r) == 12)
    # every old log-prob equals the policy's tempered log-prob of that token, recomputed
    pr = [ids[tr.group_ids[i]][mask[tr.group_ids[i]].bool()].tolist() for i in range(tr.batch_size)]
    for i, r in enumerate(rows):
        prev = [pr[i][-1]] + r[:-1]
        lp = torch.log_softmax(table[prev] / 0.8, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)  # [n]
        torch.testing.assert_close(tr.old_logprobs[i, :len(r)], lp.float(), rtol=0, atol=1e-6)
        h = -(torch.softmax(table[prev] / 0.8, -1) * torch.log_softmax(table[prev] / 0.8, -1)).sum(-1)
        torch.testing.assert_close(tr.entropies[i, :len(r)], h.float(), rtol=0, atol=1e-6)
    assert float(tr.old_logprobs[~tr.completion_mask].abs().sum()) == 0


def test_flat_group_is_depth_zero():
    be, _ = _markov(seed=4)
    ids, mask = _prompts()
    tr = sample_tree(be, ids, mask, TreeSpec(roots=5, depth=0), max_new_tokens=9, seed=0)
    assert tr.batch_size == 15 and bool((tr.parent == -1).all()) and tr.generated_tokens == tr.row_tokens


def test_too_short_leaves_still_give_every_leaf(caplog):
    # EOS is likely at every step: many leaves are too short for 2 forks at min_gap 2
    be, _ = _markov(seed=5, eos_bias=2.0)
    ids, mask = _prompts()
    spec = TreeSpec(roots=2, forks=2, branches=2, depth=2, min_gap=2)
    with caplog.at_level(logging.INFO, logger="creditlib.rl.tree"):
        tr = sample_tree(be, ids, mask, spec, max_new_tokens=10, seed=3)
    assert tr.batch_size == 3 * spec.leaves
    fb = tr.fallback
    assert fb["at_own_fork"] > 0 and fb["forks"] == 3 * spec.roots * spec.forks * (1 + spec.forks * spec.branches)
    assert any("too short" in r.getMessage() for r in caplog.records)
    # a fork at the leaf's own fork point: the child shares exactly the prefix its parent was sampled from
    own = [i for i in range(tr.batch_size) if int(tr.parent[i]) >= 0
           and int(tr.fork_pos[i]) == int(tr.fork_pos[tr.parent[i]])]
    assert len(own) >= fb["at_own_fork"] * spec.branches
    assert tr.summary()["fallback_at_own_fork"] == fb["at_own_fork"]


# ----------------------------------------------------------------------------- fairness
def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test; cells with expected count < 5 are pooled."""
    n = float(counts.sum())
    exp = probs.double() * n
    small = exp < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum().reshape(1)])
    ex = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    stat = float(((obs - ex) ** 2 / ex).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class _CopyForkToken:
    """A deliberately biased sampler: at a fork it copies the parent's token at ``k`` instead of
    re-sampling it (then samples the rest). Wraps a backend; remembers the roots it sampled."""

    def __init__(self, inner, prompt_len):
        self.inner, self.eos_ids, self.P, self.roots = inner, inner.eos_ids, prompt_len, []

    def sample(self, requests, max_new_tokens, seeds):
        out = []
        for r, m, s in zip(requests, max_new_tokens, seeds):
            if len(r) == self.P:  # a root
                c = self.inner.sample([r], [m], [s])[0]
                self.roots.append(list(r) + c.tokens)
                out.append(c)
                continue
            root = next(x for x in self.roots if x[:len(r)] == list(r))
            tok = root[len(r)]
            c = self.inner.sample([list(r) + [tok]], [m - 1], [s])[0]
            out.append(type(c)([tok] + c.tokens, torch.cat([torch.zeros(1), c.logprobs]),
                               torch.cat([torch.zeros(1), c.entropies])))
        return out


def _children_pairs(tr, V):
    """Counts of (token at the fork, next token) over the children: cell a * (V + 1) + b, b = V: none."""
    counts = torch.zeros(V * (V + 1))
    for i in range(tr.batch_size):
        if int(tr.parent[i]) < 0:
            continue
        k = int(tr.fork_pos[i])
        a = int(tr.completion_ids[i, k])
        b = int(tr.completion_ids[i, k + 1]) if bool(tr.completion_mask[i, k + 1]) else V
        counts[a * (V + 1) + b] += 1
    return counts


def test_continuations_below_a_fork_follow_the_policy():
    temp = 0.8
    be, table = _markov(seed=6, V=5, scale=1.0, eos_bias=-2.0, temperature=temp)
    V5 = 5
    ids = torch.tensor([[3, 1]])  # [1, P]
    mask = torch.ones_like(ids)
    spec = TreeSpec(roots=1, forks=1, branches=1500, depth=1)
    tr = sample_tree(be, ids, mask, spec, max_new_tokens=8, seed=2024)
    k = int(tr.fork_pos[1])
    assert bool((tr.fork_pos[1:] == k).all()) and k >= 1  # one fork: every child shares o[:k]
    prev = int(tr.completion_ids[0, k - 1])
    p = torch.softmax(table / temp, -1)  # [V, V] the policy's next-token distribution
    want = torch.zeros(V5, V5 + 1, dtype=torch.float64)  # [a, b]
    for a in range(V5):
        if a == EOS:
            want[a, V5] = p[prev, a]
        else:
            want[a, :V5] = p[prev, a] * p[a]
    counts = _children_pairs(tr, V5)
    assert _chi2_pvalue(counts, want.reshape(-1)) > 1e-3
    # negative check: the biased sampler (copies the token at k) fails the same test
    biased = _CopyForkToken(be, prompt_len=2)
    tb = sample_tree(biased, ids, mask, spec, max_new_tokens=8, seed=2024)
    assert int(tb.fork_pos[1]) == k and _chi2_pvalue(_children_pairs(tb, V5), want.reshape(-1)) < 1e-6


# ----------------------------------------------------------------------------- credit on the rows
def test_prefix_td_pushes_on_shared_tokens_sum_to_zero():
    be, _ = _markov(seed=8, eos_bias=-1.0)
    ids, mask = _prompts()
    spec = TreeSpec(roots=2, forks=2, branches=2, depth=1, min_gap=2)
    tr = sample_tree(be, ids, mask, spec, max_new_tokens=10, seed=5)
    rewards = torch.rand(tr.batch_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = F.prefix_td(tr.completion_ids, tr.completion_mask, rewards, group_ids=tr.group_ids)  # [B, T]
    adv = F.traced_credit(d, tr.completion_mask, DecayStyle("recent", gamma=1.0, lam=1.0))  # [B, T]
    rows = _rows(tr)
    checked = 0
    for g in range(3):
        members = [i for i in range(tr.batch_size) if int(tr.group_ids[i]) == g]
        for i in members:
            for k in range(len(rows[i])):
                # every row that reached o_i[:k]; if all of them chose the same token k, their pushes cancel
                S = [j for j in members if rows[j][:k] == rows[i][:k] and len(rows[j]) > k]
                if len(S) >= 2 and len({rows[j][k] for j in S}) == 1 and len(S) == len(
                        [j for j in members if rows[j][:k] == rows[i][:k]]) and i == S[0]:
                    assert abs(float(sum(adv[j, k] for j in S))) < 1e-9
                    checked += 1
    assert checked >= 10  # shared tokens before the forks exist


# ----------------------------------------------------------------------------- transformers
def test_transformers_backend_on_a_tiny_qwen2():
    from creditlib.generation import left_pad
    from creditlib.rl.model import completion_logprobs, tiny_qwen2
    from creditlib.rl.task import ChainTask, build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = tiny_qwen2(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.train()
    task = ChainTask(num_ops=6, heldout_sizes={"test": 8, "val": 8})
    enc = [tok(task.problem("train", i).prompt)["input_ids"] for i in range(3)]
    ids, pmask = left_pad(enc[:1] + [e[:-3] for e in enc[1:2]] + enc[2:], tok.pad_token_id)  # [K, P] ragged
    be = TransformersBackend(model, tok, temperature=0.9)
    spec = TreeSpec(roots=2, forks=1, branches=3, depth=1)
    tr = sample_tree(be, ids, pmask, spec, max_new_tokens=10, seed=1, tokenizer=tok, group_size=8)
    assert model.training  # restored
    assert tr.batch_size == 24 and len(tr.texts) == 24
    rows = _rows(tr)
    for i in range(tr.batch_size):
        p, k = int(tr.parent[i]), int(tr.fork_pos[i])
        if p >= 0:
            assert rows[i][:k] == rows[p][:k] and torch.equal(tr.old_logprobs[i, :k], tr.old_logprobs[p, :k])
    # the sampler's old log-probs (copied ones included) equal a recomputation with the model
    lp = completion_logprobs(model, tr.prompt_ids, tr.prompt_mask, tr.completion_ids, tr.completion_mask, 0.9)
    torch.testing.assert_close(lp.detach(), tr.old_logprobs, rtol=0, atol=1e-4)
    assert tr.generated_tokens < tr.row_tokens
    # one backend request's tokens do not depend on the batch it is in
    a = be.sample([enc[0], enc[1] + [5, 6]], [6, 4], [10, 11])
    b = be.sample([enc[1] + [5, 6]], [4], [11])
    assert a[1].tokens == b[0].tokens and len(a[1].tokens) <= 4
    torch.testing.assert_close(a[1].logprobs, b[0].logprobs, rtol=0, atol=1e-5)


def test_transformers_decoders_agree_and_branches_share_one_prefill():
    """decode='loop' (own loop: distinct prefixes prefilled once, finished rows leave the batch) and
    decode='generate' give the same tokens; identical requests keep their own seeds."""
    from creditlib.generation import left_pad
    from creditlib.rl.model import tiny_qwen2
    from creditlib.rl.task import ChainTask, build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(1)
    model = tiny_qwen2(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    task = ChainTask(num_ops=6, heldout_sizes={"test": 8, "val": 8})
    enc = [tok(task.problem("train", i).prompt)["input_ids"] for i in range(3)]
    loop = TransformersBackend(model, tok, temperature=0.9)
    gen = TransformersBackend(model, tok, temperature=0.9, decode="generate")
    assert loop.decode == "loop" and TransformersBackend(model, tok, synced=True).decode == "generate"
    # the same prefix three times (one fork's branches), another prefix, ragged caps
    reqs = [enc[0] + [5, 6]] * 3 + [enc[1]]
    caps, seeds = [7, 3, 7, 9], [4, 5, 6, 7]
    a, b = loop.sample(reqs, caps, seeds), gen.sample(reqs, caps, seeds)
    for x, y, cap in zip(a, b, caps):
        assert x.tokens == y.tokens and 1 <= len(x.tokens) <= cap
        torch.testing.assert_close(x.logprobs, y.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.entropies, y.entropies, rtol=0, atol=1e-5)
    assert a[0].tokens != a[2].tokens or a[0].logprobs.tolist() != a[2].logprobs.tolist()  # own seeds
    solo = loop.sample([reqs[2]], [7], [6])[0]  # a row alone = the row inside the batch
    assert solo.tokens == a[2].tokens
    ids, pmask = left_pad(enc, tok.pad_token_id)  # [K, P]
    ta = sample_tree(loop, ids, pmask, TreeSpec(), max_new_tokens=8, seed=3)
    tb = sample_tree(gen, ids, pmask, TreeSpec(), max_new_tokens=8, seed=3)
    assert torch.equal(ta.completion_ids, tb.completion_ids) and torch.equal(ta.fork_pos, tb.fork_pos)
    with pytest.raises(ValueError, match="decode"):
        TransformersBackend(model, tok, decode="vllm")
    with pytest.raises(ValueError, match="decode"):
        TransformersBackend(model, tok, decode="loop", synced=True)
