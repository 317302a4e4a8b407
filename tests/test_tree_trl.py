"""Tree rollouts inside TRL 1.16's real GRPOTrainer (``rollout_func``) and the vLLM tree backend's
CPU-checkable parts.

TRL: a tiny Qwen2 built from a config, an offline character tokenizer and a toy reward (as in
tests/test_integration_trl.py). Checks: the leaves of one prompt are the ``num_generations`` rows
TRL groups; the sampling (old) log-probs TRL receives equal a recomputation by TRL itself, shared
(copied) prefix tokens included; real training steps with ``prefix-gae`` and ``treerl`` change the
parameters; bad specs and options raise a ValueError naming them.

vLLM (not installed here, no GPU): the ImportError naming ``creditlib[vllm]``, the top-k entropy
estimate on plain tensors, and the parsing of vLLM's per-token logprob dicts (plain dicts).
"""

import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16

import pytest
import torch

from creditlib.rl.tree import TreeSpec

G = 4  # num_generations = leaves per prompt
SPEC = TreeSpec(roots=2, forks=1, branches=1, depth=1)  # 2 roots, each forked once: 4 leaves
MAX_LEN = 8


# ----------------------------------------------------------------------------- TRL fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is the optional extra creditlib[trl]")
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("tree_trl")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in "0123456789+= ":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    model_dir = str(root / "tiny-qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pairs = [(a, b) for a in range(4) for b in range(4)][:8]
    ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs],
                            "answer": [str((a + b) % 10) for a, b in pairs]})
    return {"root": root, "tok": tok, "model": model_dir, "ds": ds}


def answer_reward(completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def digit_reward(completions, **kwargs):
    """A dense toy reward (share of digits): a random tiny model's group always has some spread."""
    return [sum(ch.isdigit() for ch in c) / (len(c) + 1) for c in completions]


def _args(env, **kw):
    from creditlib.integrations.trl import CreditConfig

    base = dict(output_dir=str(env["root"] / "out"), per_device_train_batch_size=2 * G, num_generations=G,
                max_completion_length=MAX_LEN, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, logging_steps=1, activation_checkpointing=True, credit="prefix-gae")
    base.update(kw)
    return CreditConfig(**base)


def _trainer(env, args, spec=SPEC, reward=answer_reward, **kw):
    from creditlib.integrations.trl import CreditTrainer, tree_rollout_func

    return CreditTrainer(model=env["model"], reward_funcs=reward, args=args, train_dataset=env["ds"],
               processing_class=env["tok"], rollout_func=tree_rollout_func(spec, seed=7), **kw)


def _rows(env, k=2):
    ds = env["ds"]
    return [ds[i] for i in range(k) for _ in range(G)]  # what TRL's RepeatSampler yields


# ----------------------------------------------------------------------------- TRL
def test_leaves_are_trls_groups_and_old_logprobs_equal_recomputation(env):
    trainer = _trainer(env, _args(env))
    trainer.model.train()
    out = trainer._generate_and_score_completions(_rows(env))
    tree = trainer.rollout_func.last_rollout
    assert tree.batch_size == 2 * G and tree.spec.leaves == G
    assert tree.group_ids.tolist() == [k for k in range(2) for _ in range(G)]  # rows [kG, (k+1)G) = prompt k
    cmask = out["completion_mask"].bool()  # [B, T]
    T = cmask.shape[1]
    assert torch.equal(cmask.sum(1), tree.completion_mask.sum(1))
    assert torch.equal(out["completion_ids"][cmask], tree.completion_ids[:, :T][tree.completion_mask[:, :T]])
    # every prompt's leaves share the prompt and hold a real fork: child rows copy their parent's prefix
    child = (tree.parent >= 0).nonzero().squeeze(1).tolist()
    assert len(child) == 2 * 2 and any(int(tree.fork_pos[i]) > 0 for i in child)
    for i in child:
        p, k = int(tree.parent[i]), int(tree.fork_pos[i])
        assert tree.group_ids[p] == tree.group_ids[i]
        assert torch.equal(tree.completion_ids[i, :k], tree.completion_ids[p, :k])
    # TRL received the tree's sampling log-probs; its own recomputation agrees (shared tokens included)
    sampled = out["sampling_per_token_logps"]  # [B, T]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        from trl import GRPOTrainer

        recomputed, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, att, T)
    torch.testing.assert_close(sampled[cmask], recomputed[cmask], rtol=1e-4, atol=1e-5)
    shared = torch.zeros_like(cmask)  # [B, T] copied prefix tokens of the children
    for i in child:
        shared[i, :int(tree.fork_pos[i])] = True
    assert shared.any()
    torch.testing.assert_close(sampled[shared], recomputed[shared], rtol=1e-4, atol=1e-5)
    # per-token prefix-tree advantages over TRL's groups, and the tree's metrics
    assert out["advantages"].shape == cmask.shape
    assert trainer._metrics["train"]["tree/token_ratio"][-1] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("credit", ["prefix-gae", "treerl"])
def test_real_training_step_changes_parameters(env, credit):
    args = _args(env, credit=credit, max_steps=1, learning_rate=5e-2)
    trainer = _trainer(env, args, reward=digit_reward)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and "tree/generated_tokens" in logs[0]
    assert logs[0]["reward_std"] > 0  # a learning signal reached the loss
    assert trainer.rollout_func.calls == 1


def test_spec_must_give_num_generations(env):
    with pytest.raises(ValueError, match=r"num_generations=4 .*6 leaves"):
        _trainer(env, _args(env), spec=TreeSpec(roots=2, forks=1, branches=2, depth=1))


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.9), "top_p=0.9"),
    (dict(top_k=5), "top_k=5"),
    (dict(repetition_penalty=1.1), "repetition_penalty"),
    (dict(min_p=0.1), "min_p=0.1"),
    (dict(use_vllm=True), "use_vllm=True"),
])
def test_options_the_tree_cannot_honour_are_refused(env, kw, match):
    with pytest.raises(ValueError, match=match):
        _trainer(env, _args(env, **kw))


def test_plain_grpo_trainer_checks_at_call_time(env):
    """Without the mixin the checks run when TRL calls the function: a wrong group size, a split group."""
    from trl import GRPOConfig, GRPOTrainer

    from creditlib.integrations.trl import tree_rollout_func

    args = GRPOConfig(output_dir=str(env["root"] / "out2"), per_device_train_batch_size=2 * G, num_generations=G,
                      max_completion_length=MAX_LEN, report_to="none", save_strategy="no", use_cpu=True,
                      disable_tqdm=True, activation_checkpointing=True)
    func = tree_rollout_func(TreeSpec(roots=3, depth=0), seed=0)
    tr = GRPOTrainer(model=env["model"], reward_funcs=answer_reward, args=args, train_dataset=env["ds"],
                     processing_class=env["tok"], rollout_func=func)
    tr.model.train()
    with pytest.raises(ValueError, match="num_generations=4"):
        func([r["prompt"] for r in _rows(env)], tr)
    func.spec = SPEC
    prompts = [r["prompt"] for r in _rows(env)]
    with pytest.raises(ValueError, match="not whole groups"):
        func(prompts[:6], tr)
    with pytest.raises(ValueError, match="not one prompt"):
        func(prompts[1:] + prompts[:1], tr)
    out = func(prompts, tr)  # the right call: a dict TRL accepts
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs"} and len(out["completion_ids"]) == 2 * G
    assert all(len(c) == len(lp) for c, lp in zip(out["completion_ids"], out["logprobs"]))
    # more processes: each must hold whole groups (TRL itself only checks the global generation batch)
    args.per_device_train_batch_size = 6
    with pytest.raises(ValueError, match="not a multiple of num_generations=4"):
        func.check_config(args)


def test_tree_rollout_func_rejects_bad_arguments():
    pytest.importorskip("trl")
    from creditlib.integrations.trl import tree_rollout_func

    with pytest.raises(ValueError, match="spec must be"):
        tree_rollout_func(8)
    with pytest.raises(ValueError, match="seed"):
        tree_rollout_func(SPEC, seed=1.5)
    with pytest.raises(ValueError, match="decode"):
        tree_rollout_func(SPEC, decode="beam")


# ----------------------------------------------------------------------------- vLLM backend (CPU-checkable parts)
def test_vllm_backend_without_vllm_names_the_extra(monkeypatch):
    from creditlib.rl.tree import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"creditlib\[vllm\]"):
        VLLMBackend(object())


def test_topk_entropy_is_a_lower_bound_exact_with_all_tokens():
    from creditlib.rl.tree import topk_entropy

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 12, generator=g) * 2, -1)  # [R, V] five distributions
    full = -(lp.exp() * lp).sum(-1)  # [R]
    top, _ = lp.sort(-1, descending=True)  # [R, V]
    torch.testing.assert_close(topk_entropy(top), full, rtol=1e-6, atol=1e-6)  # k = V: exact
    est = [topk_entropy(top[:, :k]) for k in range(1, 13)]  # [R] each
    for a, b in zip(est, est[1:]):
        assert bool((a <= b + 1e-6).all())  # never decreases with k
    assert bool((est[3] < full - 1e-3).all())  # k = 4 of 12 misses some: strictly below
    # one listed token with p = 1: entropy 0; two tokens of 1/2 listed as one plus the rest: log 2
    assert float(topk_entropy(torch.tensor([[0.0]]))) == 0.0
    torch.testing.assert_close(topk_entropy(torch.tensor([math.log(0.5)])), torch.tensor(math.log(2.0)))
    # a hand value: p = (0.5, 0.3), rest 0.2 lumped
    want = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert float(topk_entropy(torch.tensor([math.log(0.3), math.log(0.5)]))) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="logprobs"):
        topk_entropy(torch.tensor([0.5]))


def test_vllm_logprob_dicts_become_a_continuation():
    """vLLM's per-step ``{token_id: logprob}`` (top-k plus the sampled token), as plain dicts."""
    from creditlib.rl.tree import _vllm_continuation, topk_entropy

    ln = math.log
    steps = [{5: ln(0.6), 7: ln(0.3)}, {3: ln(0.5), 1: ln(0.25), 4: ln(0.1)}, {9: ln(0.9)}, {2: ln(0.8)}]
    c = _vllm_continuation([7, 1, 9, 2], steps, eos_ids=[1], cap=10)  # cut after the EOS (1), kept
    assert c.tokens == [7, 1]
    torch.testing.assert_close(c.logprobs, torch.tensor([ln(0.3), ln(0.25)], dtype=torch.float32))
    torch.testing.assert_close(c.entropies[1], topk_entropy(torch.tensor([ln(0.5), ln(0.25), ln(0.1)])))
    assert _vllm_continuation([7, 3, 9], steps, eos_ids=[1], cap=2).tokens == [7, 3]  # the cap
    with pytest.raises(RuntimeError, match="sampled token"):
        _vllm_continuation([8], steps, eos_ids=[1], cap=4)
    with pytest.raises(RuntimeError, match="logprobs"):
        _vllm_continuation([7, 3], steps[:1], eos_ids=[1], cap=4)
