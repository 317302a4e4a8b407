"""The pipelined tree decoder (issue 19, speed): ``sample_tree(..., pipeline=True)`` against the
two-round sampler (``pipeline=False``) with the same seed and the same policy, for every ``select``
(segment forks known in advance; entropy and uniform forks speculative: branches of the current
picks decode beside their parent and are dropped or re-spawned when the picks move): the same
leaves (tokens, slots, parents, fork positions, fallbacks), old log-probs and entropies up to float
tolerance. A Markov policy (``CallableBackend``: exact, many shapes) and a tiny Qwen2 through
``TransformersBackend`` in float64 (the cache rows of a branch are computed step by step in a batch,
some with masked-out columns, not by one prefill: float64 keeps the Gumbel argmax away from
last-bit ties) and in float32."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from creditlib.rl.tree import CallableBackend, TransformersBackend, TreeSpec, sample_tree  # noqa: E402

SELECTS = ("segment", "entropy", "uniform")

EOS = 0
FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group_ids", "parent", "fork_pos",
          "depth")


def _markov(seed=0, V=6, eos_bias=0.0, temperature=0.8):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5  # [V, V] next-token logits
    table[:, EOS] += eos_bias
    return CallableBackend(lambda seqs: table[[s[-1] for s in seqs]], [EOS], temperature=temperature)


def _prompts():
    ids = torch.tensor([[0, 0, 3, 4], [5, 1, 2, 3], [0, 2, 4, 1]])  # [K, P] left padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])  # [K, P]
    return ids, mask


def _same_tree(a, b, atol=0.0):
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.fallback == b.fallback
    if atol == 0.0:
        assert torch.equal(a.old_logprobs, b.old_logprobs) and torch.equal(a.entropies, b.entropies)
    else:
        torch.testing.assert_close(a.old_logprobs, b.old_logprobs, rtol=0, atol=atol)
        torch.testing.assert_close(a.entropies, b.entropies, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- exact: a Markov policy
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("shape", [(2, 1, 3, 1), (1, 2, 2, 2), (2, 3, 1, 1), (1, 1, 2, 3), (3, 1, 1, 0)])
def test_pipelined_equals_two_rounds_markov(shape, select):
    """Bit-equal trees over seeds, gaps, caps and EOS-heavy policies (leaves too short to fork:
    both fallbacks), at depths 0 to 3; for entropy and uniform forks the speculative regimes are
    all exercised: branches dropped when a pick moved, and branches spawned after their fork
    position (a pick that changed rank, a re-selected position, a fallback decided at the end)."""
    M, N, Bf, D = shape
    ids, mask = _prompts()
    fell_back = clean = relaxed = dropped = late = 0
    for seed, (S, gap), bias, T in itertools.product(range(2), [(1, 1), (3, 2), (4, 4)], [-2.0, 1.5], [5, 12]):
        be = _markov(seed + 5 * (bias > 0), eos_bias=bias)
        spec = TreeSpec(roots=M, forks=N, branches=Bf, depth=D, select=select, segment_len=S, min_gap=gap)
        a = sample_tree(be, ids, mask, spec, max_new_tokens=T, seed=seed)
        b = sample_tree(be, ids, mask, spec, max_new_tokens=T, seed=seed, pipeline=True)
        _same_tree(a, b)  # the CallableBackend's logits do not depend on the batch: bit-equal
        fell_back += a.fallback.get("at_own_fork", 0) > 0
        clean += D > 0 and a.fallback["at_own_fork"] == 0
        relaxed += a.fallback.get("relaxed_gap", 0) > 0
        dropped += b.pipeline_stats["dropped_rows"] > 0
        late += b.pipeline_stats["late_spawns"] > 0
        assert b.pipeline_stats["spawned_rows"] - b.pipeline_stats["dropped_rows"] == b.batch_size - 3 * M
    if D > 0:  # both regimes were exercised: leaves too short to fork, and every fork online
        assert fell_back > 0 and late > 0
        if D == 1 or select == "segment":  # (deeper entropy trees here always hold some short leaf)
            assert clean > 0
        if N > 1 and select != "segment":
            assert relaxed > 0
        if select != "segment":
            assert dropped > 0
    else:
        assert late == dropped == 0


def test_pipelined_flat_group_and_other_seeds_differ():
    be = _markov(1)
    ids, mask = _prompts()
    flat = TreeSpec(roots=4, depth=0, select="entropy")  # depth 0: no fork, any select
    _same_tree(sample_tree(be, ids, mask, flat, max_new_tokens=9, seed=2),
               sample_tree(be, ids, mask, flat, max_new_tokens=9, seed=2, pipeline=True))
    spec = TreeSpec(select="segment", segment_len=2)
    a = sample_tree(be, ids, mask, spec, max_new_tokens=9, seed=2, pipeline=True)
    b = sample_tree(be, ids, mask, spec, max_new_tokens=9, seed=3, pipeline=True)
    assert not torch.equal(a.completion_ids, b.completion_ids)


def test_pipeline_bad_input():
    be = _markov(0)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="pipeline must be a bool"):
        sample_tree(be, ids, mask, TreeSpec(select="segment"), max_new_tokens=8, pipeline=1)

    class NoSteps:  # a TreeBackend without a step decoder (e.g. vLLM's)
        eos_ids = [EOS]

        def sample(self, requests, max_new_tokens, seeds):
            return be.sample(requests, max_new_tokens, seeds)

    with pytest.raises(ValueError, match="step_decoder"):
        sample_tree(NoSteps(), ids, mask, TreeSpec(select="segment"), max_new_tokens=8, pipeline=True)
    sample_tree(NoSteps(), ids, mask, TreeSpec(select="segment"), max_new_tokens=8)  # the two-round path
    with pytest.raises(ValueError, match="step_decoder"):
        sample_tree(NoSteps(), ids, mask, TreeSpec(), max_new_tokens=8, pipeline=True)


def test_uniform_keys_drawn_once_equal_the_two_round_keys():
    """The pipelined sampler draws a leaf's ``"uniform"`` keys as ``torch.rand(T)`` before its
    length ``n`` is known; the two-round sampler draws ``torch.rand(n)`` from the same seed. Torch's
    CPU generator gives the same first ``n`` numbers (and the same as ``n`` draws of one)."""
    for n in list(range(1, 70)) + [255, 256, 1000]:
        g = torch.Generator().manual_seed(1000 + n)
        block = torch.rand(1100, generator=torch.Generator().manual_seed(1000 + n))  # [1100]
        assert torch.equal(block[:n], torch.rand(n, generator=g))
        g.manual_seed(1000 + n)
        assert torch.equal(block[:n], torch.cat([torch.rand(1, generator=g) for _ in range(n)]))


@pytest.mark.parametrize("select", ["entropy", "uniform"])
def test_spawn_delay_same_tree_fewer_dropped_rows(select):
    """``spawn_delay``: a pick's branches start once it lies that many tokens behind the newest one
    (with a hole in their cache rows). Every delay gives the same tree; the dropped rows never grow
    with the delay, and at ``spawn_delay >= T`` none is dropped (every branch starts when its
    parent ends) while the decode takes more steps."""
    ids, mask = _prompts()
    for seed, (N, gap, D) in itertools.product(range(2), [(1, 1, 1), (1, 1, 2), (2, 1, 1), (2, 3, 2)]):
        be = _markov(seed + 7, eos_bias=-2.5)
        spec = TreeSpec(roots=2, forks=N, branches=2, depth=D, select=select, min_gap=gap)
        a = sample_tree(be, ids, mask, spec, max_new_tokens=14, seed=seed)
        stats = []
        for delay in (0, 1, 3, 14):
            b = sample_tree(be, ids, mask, spec, max_new_tokens=14, seed=seed, pipeline=True, spawn_delay=delay)
            _same_tree(a, b)
            stats.append(b.pipeline_stats)
        if N == 1:  # one pick: its branches are dropped only if a later token beats it within the delay
            drops = [x["dropped_rows"] for x in stats]
            assert drops == sorted(drops, reverse=True)
        assert stats[-1]["dropped_rows"] == 0 and stats[-1]["spawned_rows"] == a.batch_size - 2 * ids.shape[0]
        assert stats[-1]["late_spawns"] > 0 and stats[0]["dropped_rows"] > 0
        assert stats[-1]["decode_steps"] >= stats[0]["decode_steps"]
    with pytest.raises(ValueError, match="spawn_delay must be an int >= 0"):
        sample_tree(be, ids, mask, spec, max_new_tokens=8, pipeline=True, spawn_delay=-1)
    with pytest.raises(ValueError, match="spawn_delay=2 needs pipeline=True"):
        sample_tree(be, ids, mask, spec, max_new_tokens=8, spawn_delay=2)


def test_speculative_forks_one_fork_spawn_on_time():
    """One entropy fork per leaf (the default tree): the pick is the running arg-max of the allowed
    entropies, so its branches start at the step that draws it (never late) unless the leaf is too
    short (then at the leaf's end, at its own fork point); a branch is dropped only when a later
    token beats its position. Every surviving branch sits at its parent's final pick."""
    ids, mask = _prompts()
    be = _markov(4, eos_bias=-3.0)
    spec = TreeSpec()
    on_time = 0
    for seed in range(4):
        b = sample_tree(be, ids, mask, spec, max_new_tokens=16, seed=seed, pipeline=True)
        a = sample_tree(be, ids, mask, spec, max_new_tokens=16, seed=seed)
        _same_tree(a, b)
        st = b.pipeline_stats
        assert st["late_spawns"] == 3 * b.fallback["at_own_fork"]
        assert st["spawned_rows"] == st["dropped_rows"] + 6 * ids.shape[0]
        if st["late_spawns"] == 0:
            assert st["decode_steps"] == int(b.completion_mask.sum(1).max())  # one decode pass
            on_time += 1
    assert on_time > 0


# ----------------------------------------------------------------------------- a tiny Qwen2
def _qwen(dtype, seed=0, std=0.4):
    """A tiny Qwen2 whose weights (norms aside) are drawn with std ``std``: at the default init (0.02)
    its next-token distributions are uniform to 1% (entropy 2.87 of log 18 = 2.89 nats), so its
    tokens would follow the Gumbel noise whatever the cache holds; at 0.4 the mean entropy is
    about 1.5 nats and the tokens depend on the logits."""
    from creditlib.generation import left_pad
    from creditlib.rl.model import tiny_qwen2
    from creditlib.rl.task import ChainTask, build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    model = model.to(dtype)
    task = ChainTask(num_ops=6, heldout_sizes={"test": 8, "val": 8})
    enc = [tok(task.problem("train", i).prompt)["input_ids"] for i in range(3)]
    ids, pmask = left_pad([enc[0], enc[1][:-3], enc[2][:-1]], tok.pad_token_id)  # [3, P] three lengths
    return model, tok, ids, pmask


def test_hole_masked_cache_row_equals_prefill_float64():
    """A branch spawned after its fork position: a copy of the parent's cache row, which holds
    ``prompt + o[:j]``, with the columns of ``o[k:j]`` masked out, continued with its own tokens, gives
    the logits of a fresh prefill of ``prompt + o[:k] + its tokens`` (float64, left-padded prompts
    of three lengths): the positions go on from the real tokens kept, not from the cache length."""
    from creditlib.rl.tree import _KVStepDecoder

    model, tok, ids, pmask = _qwen(torch.float64)
    be = TransformersBackend(model, tok)
    prompts = [ids[i][pmask[i].bool()].tolist() for i in range(3)]
    g = torch.Generator().manual_seed(0)
    o = torch.randint(1, len(tok), (3, 7), generator=g)  # [3, 7] the parents' tokens
    own = torch.randint(1, len(tok), (6, 3), generator=g)  # [6, 3] the branches' tokens
    with _KVStepDecoder(be) as dec:
        dec.prefill(prompts)
        for j in range(7):  # the parents' cache rows hold prompt + o[:7]
            dec.step(o[:, j])
        rows, cuts = [0, 1, 2, 2, 0, 1], [2, 0, 5, 7, 6, 3]  # branch i forks row rows[i] at cuts[i]
        dec.select(rows + [0], [len(prompts[r]) + k for r, k in zip(rows, cuts)] + [None])
        got = [dec.step(torch.cat([own[:, t], o[:1, 0]]))[:6] for t in range(3)]  # [6, V] per step
    for i, (r, k) in enumerate(zip(rows, cuts)):
        for t in range(3):
            seq = prompts[r] + o[r, :k].tolist() + own[i, :t + 1].tolist()
            with torch.no_grad():
                want = model(input_ids=torch.tensor([seq])).logits[0, -1]  # [V]
            torch.testing.assert_close(got[t][i], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("select", SELECTS)
def test_pipelined_equals_two_rounds_tiny_qwen2_float64(select):
    """float64 model: the same tokens, fallbacks and slots; old log-probs and entropies (float32,
    computed from float64 logits) within 1e-6. Extra EOS ids (every 4th token) make leaves of every
    length, some too short to fork. With two forks, branches are spawned late (a pick that changed
    rank or came back: cache rows with a hole)."""
    model, tok, ids, pmask = _qwen(torch.float64)
    model.train()
    fell_back = clean = late = 0
    for eos_ids in ([tok.eos_token_id], [tok.eos_token_id] + list(range(3, len(tok), 4))):
        be = TransformersBackend(model, tok, temperature=0.9, eos_ids=eos_ids)
        for seed, ((M, N, Bf, D), (S, gap), T) in enumerate(itertools.product(
                [(2, 1, 3, 1), (1, 2, 2, 2)], [(1, 1), (3, 2)], [6, 12])):  # another seed per shape
            spec = TreeSpec(roots=M, forks=N, branches=Bf, depth=D, select=select, segment_len=S, min_gap=gap)
            a = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed)
            b = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed, pipeline=True)
            _same_tree(a, b, atol=1e-6)
            fell_back += a.fallback["at_own_fork"] > 0
            clean += a.fallback["at_own_fork"] == 0
            late += b.pipeline_stats["late_spawns"] > b.fallback["at_own_fork"] * Bf
    assert fell_back > 0 and clean > 0
    if select != "segment":
        assert late > 0
    assert model.training  # restored after the pipelined call


def test_pipelined_tiny_qwen2_float32_and_recomputed_logprobs():
    """float32 (the recipe's dtype): the same tree on these seeds (a last-bit difference of the
    logits could flip a Gumbel tie, which is why the exact test runs in float64), and the old
    log-probs, copied prefixes included, equal a recomputation with the model."""
    from creditlib.rl.model import completion_logprobs

    model, tok, ids, pmask = _qwen(torch.float32, seed=1)
    be = TransformersBackend(model, tok, temperature=0.9)
    for seed in range(3):
        spec = TreeSpec(roots=2, forks=1, branches=3, select="segment", segment_len=4)
        a = sample_tree(be, ids, pmask, spec, max_new_tokens=10, seed=seed, group_size=8, tokenizer=tok)
        b = sample_tree(be, ids, pmask, spec, max_new_tokens=10, seed=seed, group_size=8, pipeline=True, tokenizer=tok)
        _same_tree(a, b, atol=1e-4)
        assert b.texts == a.texts and len(b.texts) == b.batch_size
    lp = completion_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, 0.9)
    torch.testing.assert_close(lp.detach(), b.old_logprobs, rtol=0, atol=1e-4)


def test_pipelined_tree_takes_one_decode_pass():
    """Without fallbacks, the pipelined tree is one prefill and at most ``T - 1`` decode steps (the
    branches run beside their parent); the two-round sampler needs two prefills and up to
    ``T + (T - k)`` steps. Counted as model forward calls."""
    model, tok, ids, pmask = _qwen(torch.float32, seed=2, std=0.8)
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    be = TransformersBackend(model, tok, temperature=1.0)
    T = 12
    spec = TreeSpec(roots=2, forks=1, branches=3, select="segment", segment_len=5)
    try:
        b = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=0, pipeline=True)
        n_pipe = len(calls)
        calls.clear()
        a = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=0)
        n_plain = len(calls)
    finally:
        h.remove()
    _same_tree(a, b, atol=1e-4)
    assert a.fallback["at_own_fork"] == 0 and bool((a.fork_pos[a.parent >= 0] == 5).all())
    rows = a.completion_mask.sum(1)  # [B]
    assert n_pipe == int(rows.max())  # prefill + one step per token after the first
    assert n_plain == int(rows[a.parent < 0].max()) + int((rows - a.fork_pos)[a.parent >= 0].max())
    assert n_pipe < n_plain
    with pytest.raises(ValueError, match="decode='loop'"):
        sample_tree(TransformersBackend(model, tok, decode="generate"), ids, pmask, spec, max_new_tokens=T,
                    pipeline=True)


def test_pipelined_entropy_tree_takes_one_decode_pass():
    """The default tree (``TreeSpec()``: entropy forks, 2 roots x 1 fork x 3 branches), pipelined:
    without fallbacks it is one prefill and ``max row length - 1`` decode steps (model forward
    calls), the branches spawned at the step that draws their fork position; the two-round sampler
    needs two prefills and up to ``T + (T - k)`` steps. Branch rows dropped when a later token beat
    the pick are counted (``pipeline_stats``), never kept."""
    model, tok, ids, pmask = _qwen(torch.float32, seed=2, std=0.8)
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    be = TransformersBackend(model, tok, temperature=1.0)
    T, spec, seen = 12, TreeSpec(), 0
    try:
        for seed in range(3):
            calls.clear()
            b = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed, pipeline=True)
            n_pipe = len(calls)
            calls.clear()
            a = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed)
            n_plain = len(calls)
            _same_tree(a, b, atol=1e-4)
            st = b.pipeline_stats
            assert st["decode_steps"] == n_pipe
            assert st["spawned_rows"] - st["dropped_rows"] == 6 * ids.shape[0]
            if a.fallback["at_own_fork"] == 0:
                seen += 1
                assert st["late_spawns"] == 0
                rows = a.completion_mask.sum(1)  # [B]
                assert n_pipe == int(rows.max())
                assert n_plain == int(rows[a.parent < 0].max()) + int((rows - a.fork_pos)[a.parent >= 0].max())
                assert n_pipe < n_plain
    finally:
        h.remove()
    assert seen > 0
