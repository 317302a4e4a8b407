"""The pipelined segment-tree decoder (issue 19, speed): ``sample_tree(..., pipeline=True)`` against
the two-round sampler (``pipeline=False``) with the same seed and the same policy: the same leaves
(tokens, slots, parents, fork positions, fallbacks), old log-probs and entropies up to float
tolerance. A Markov policy (``CallableBackend``: exact, many shapes) and a tiny Qwen2 through
``TransformersBackend`` in float64 (the cache rows of a branch are computed step by step in a batch,
not by one prefill: float64 keeps the Gumbel argmax away from last-bit ties) and in float32."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from creditlib.rl.tree import CallableBackend, TransformersBackend, TreeSpec, sample_tree  # noqa: E402

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
@pytest.mark.parametrize("shape", [(2, 1, 3, 1), (1, 2, 2, 2), (2, 3, 1, 1), (1, 1, 2, 3), (3, 1, 1, 0)])
def test_pipelined_equals_two_rounds_markov(shape):
    M, N, Bf, D = shape
    ids, mask = _prompts()
    fell_back = clean = 0
    for seed, (S, gap), bias, T in itertools.product(range(3), [(1, 1), (3, 2), (4, 4)], [-2.0, 0.0, 1.5], [5, 12]):
        be = _markov(seed, eos_bias=bias)
        spec = TreeSpec(roots=M, forks=N, branches=Bf, depth=D, select="segment", segment_len=S, min_gap=gap)
        a = sample_tree(be, ids, mask, spec, max_new_tokens=T, seed=seed)
        b = sample_tree(be, ids, mask, spec, max_new_tokens=T, seed=seed, pipeline=True)
        _same_tree(a, b)  # the CallableBackend's logits do not depend on the batch: bit-equal
        fell_back += a.fallback.get("at_own_fork", 0) > 0
        clean += D > 0 and a.fallback["at_own_fork"] == 0
    if D > 0:  # both regimes were exercised: leaves too short to fork, and every fork online
        assert fell_back > 0 and clean > 0


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
    with pytest.raises(ValueError, match="pipeline=True needs select='segment'"):
        sample_tree(be, ids, mask, TreeSpec(select="entropy"), max_new_tokens=8, pipeline=True)
    with pytest.raises(ValueError, match="pipeline must be a bool"):
        sample_tree(be, ids, mask, TreeSpec(select="segment"), max_new_tokens=8, pipeline=1)

    class NoSteps:  # a TreeBackend without a step decoder (e.g. vLLM's)
        eos_ids = [EOS]

        def sample(self, requests, max_new_tokens, seeds):
            return be.sample(requests, max_new_tokens, seeds)

    with pytest.raises(ValueError, match="step_decoder"):
        sample_tree(NoSteps(), ids, mask, TreeSpec(select="segment"), max_new_tokens=8, pipeline=True)
    sample_tree(NoSteps(), ids, mask, TreeSpec(select="segment"), max_new_tokens=8)  # the two-round path


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


def test_pipelined_equals_two_rounds_tiny_qwen2_float64():
    """float64 model: the same tokens, fallbacks and slots; old log-probs and entropies (float32,
    computed from float64 logits) within 1e-6. Extra EOS ids (every 4th token) make leaves of every
    length, some too short to fork."""
    model, tok, ids, pmask = _qwen(torch.float64)
    model.train()
    fell_back = clean = 0
    for eos_ids in ([tok.eos_token_id], [tok.eos_token_id] + list(range(3, len(tok), 4))):
        be = TransformersBackend(model, tok, temperature=0.9, eos_ids=eos_ids)
        for seed, ((M, N, Bf, D), (S, gap), T) in enumerate(itertools.product(
                [(2, 1, 3, 1), (1, 2, 2, 2)], [(1, 1), (3, 2)], [6, 12])):  # another seed per shape
            spec = TreeSpec(roots=M, forks=N, branches=Bf, depth=D, select="segment", segment_len=S, min_gap=gap)
            a = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed)
            b = sample_tree(be, ids, pmask, spec, max_new_tokens=T, seed=seed, pipeline=True)
            _same_tree(a, b, atol=1e-6)
            fell_back += a.fallback["at_own_fork"] > 0
            clean += a.fallback["at_own_fork"] == 0
    assert fell_back > 0 and clean > 0
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
