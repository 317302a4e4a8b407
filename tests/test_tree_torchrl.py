"""Tree rollouts in TorchRL (issue 19, item 4): ``TreeRollout.to_tensordict()`` is what
``credit_pipeline(NAME)`` and ``GRPOLambdaLoss`` take unchanged (the recipe's keys)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchrl")
pytest.importorskip("transformers")

from creditlib import DecayStyle  # noqa: E402
from creditlib import functional as F  # noqa: E402
from creditlib.credit import get_credit  # noqa: E402
from creditlib.modules import credit_pipeline  # noqa: E402
from creditlib.rl.tree import CallableBackend, TransformersBackend, TreeSpec, sample_tree  # noqa: E402

RESPONSE, MASK = ("tokens", "response"), ("masks", "response")


def _markov_tree(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(6, 6, generator=g, dtype=torch.float64) * 1.5  # [V, V] next-token logits
    table[:, 0] -= 1.0  # EOS = 0 less likely: longer rows, more shared prefix
    be = CallableBackend(lambda seqs: table[[s[-1] for s in seqs]], [0], temperature=0.8)
    ids = torch.tensor([[0, 3, 4], [5, 1, 2], [2, 4, 1]])  # [K, P] left padded
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])  # [K, P]
    return sample_tree(be, ids, mask, spec, max_new_tokens=10, seed=seed)


def test_tensordict_keys_and_values():
    tr = _markov_tree(TreeSpec(roots=2, forks=2, branches=2, depth=1, min_gap=2))
    B, T = tr.completion_ids.shape
    rewards = torch.arange(B, dtype=torch.float64) % 3  # [B]
    td = tr.to_tensordict(rewards)
    assert td.batch_size == torch.Size([B])
    assert torch.equal(td[RESPONSE], tr.completion_ids) and torch.equal(td[MASK], tr.completion_mask)
    assert torch.equal(td["tokens", "prompt"], tr.prompt_ids) and torch.equal(td["masks", "prompt"], tr.prompt_mask)
    assert torch.equal(td["log_probs", "response"], tr.old_logprobs)
    assert torch.equal(td["entropy"], tr.entropies) and torch.equal(td["group_id"], tr.group_ids)
    assert td["reward"].shape == (B, 1, 1) and td["reward"].dtype == torch.float32
    assert torch.equal(td["reward"].flatten(), rewards.float())
    assert "reward" not in tr.to_tensordict().keys()
    for bad in (rewards[:-1], torch.ones(B, dtype=torch.long), [1.0] * B):
        with pytest.raises(ValueError, match="rewards"):
            tr.to_tensordict(bad)


@pytest.mark.parametrize("name", ["prefix-gae", "prefix-gae-clamp", "prefix-gae-lambda", "grpo"])
def test_credit_pipeline_on_the_tree_equals_functional(name):
    spec = TreeSpec(roots=2, forks=1, branches=3, depth=1)
    tr = _markov_tree(spec, seed=3)
    B = tr.batch_size
    rewards = (tr.completion_ids.gather(1, tr.completion_mask.sum(1, keepdim=True) - 1).squeeze(1) == 3).double()
    rewards[::5] = 1 - rewards[::5]  # [B] both outcomes in every group
    m = get_credit(name)
    for groups in (dict(group_size=tr.group_size), dict(group_id_key="group_id")):
        td = credit_pipeline(name, tokens_key=RESPONSE, mask_key=MASK, keepdim=True, **groups)(tr.to_tensordict(rewards))
        got = td["advantage"]
        mask = tr.completion_mask
        r32 = rewards.float()
        if m.advantage == "prefix_td":  # the plain rows through the functional API
            d = F.prefix_td(tr.completion_ids, mask, r32, group_ids=tr.group_ids, scale=m.scale)  # [B, T]
            want = F.traced_credit(d, mask, DecayStyle("recent", gamma=m.gae_gamma, lam=m.gae_lam))  # [B, T]
            if m.clamp_min is not None:
                want = want.clamp_min(m.clamp_min)
            assert got.shape == (B, mask.shape[1], 1)
            torch.testing.assert_close(got.squeeze(-1)[mask], want[mask], rtol=1e-6, atol=1e-6)
        else:
            want = F.group_advantage(r32, group_ids=tr.group_ids)  # [B]
            torch.testing.assert_close(got.flatten(), want)
        assert bool(got.abs().sum() > 0)


def test_grpo_lambda_loss_backward_on_a_sampled_tree():
    from creditlib.generation import left_pad
    from creditlib.losses import GRPOLambdaLoss
    from creditlib.rl.model import tiny_qwen2
    from creditlib.rl.policy import CompletionPolicy
    from creditlib.rl.task import ChainTask, build_char_tokenizer, chain_reward

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = tiny_qwen2(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    task = ChainTask(num_ops=4, heldout_sizes={"test": 4, "val": 4})
    probs = [task.problem("train", i) for i in range(2)]
    ids, pmask = left_pad([tok(p.prompt)["input_ids"] for p in probs], tok.pad_token_id)  # [K, P]
    temp = 0.9
    tr = sample_tree(TransformersBackend(model, tok, temperature=temp), ids, pmask, TreeSpec(),
                     max_new_tokens=task.completion_length, seed=0, tokenizer=tok, group_size=8)
    rewards = torch.tensor(chain_reward(tr.texts, [probs[int(g)].answer for g in tr.group_ids]))  # [B]
    rewards[::3] = 1.0  # a random policy is never right: give each group both outcomes
    td = tr.to_tensordict(rewards)
    method = get_credit("prefix-gae")
    td = credit_pipeline(method, group_size=tr.group_size, tokens_key=RESPONSE, mask_key=MASK, keepdim=True)(td)
    policy = CompletionPolicy(model, temp)
    loss_fn = GRPOLambdaLoss.from_credit(method, policy, entropy_bonus=False)
    loss_fn.set_keys(action=RESPONSE, sample_log_prob=("log_probs", "response"))
    model.train()
    out = loss_fn(td)
    out.loss_objective.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the sampler's old log-probs are the policy's: the ratio is 1 on the first step, nothing clipped
    assert float(out.traced_clip_fraction) == 0.0
