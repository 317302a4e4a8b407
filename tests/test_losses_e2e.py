"""End to end on CPU: generate -> verify -> group advantage -> GRPOLambdaLoss -> AdamW step.

Real components only: a tiny Qwen2 built from a config, a tokenizer trained in code with
``tokenizers``, TorchRL's ``TransformersWrapper`` (tokens mode) sampling a group of completions per
prompt, a verifier function on the decoded text, creditlib's ``CriticFreeTD`` + ``ClampNegative``,
``GRPOLambdaLoss``, backward, and an optimizer step that changes the policy. A second run selects
the whole credit stage by name from the registry (``credit_pipeline`` + ``GRPOLambdaLoss.from_credit``)
with per-token prefix-tree advantages ``[B, T, 1]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("torchrl.objectives.llm.grpo")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import TensorDictSequential  # noqa: E402

from creditlib import ClampNegative, CriticFreeTD, DecayStyle  # noqa: E402
from creditlib.losses import GRPOLambdaLoss, aggregate  # noqa: E402

CORPUS = [
    "question : is the sky blue ? answer : yes",
    "question : is fire cold ? answer : no",
    "question : is two more than one ? answer : yes",
    "question : is ice hot ? answer : no maybe",
]
PROMPTS = ["question : is the sky blue ? answer :", "question : is ice hot ? answer :"]
G = 4  # completions per prompt
MAX_NEW = 8


def build_tokenizer():
    """A word-level tokenizer trained in code on CORPUS (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]", padding_side="left")


def verifier(completion: str) -> float:
    """Reward 1 when the completion answers 'yes' (anywhere), else 0."""
    return 1.0 if "yes" in completion.split() else 0.0


@pytest.fixture(scope="module")
def rollout():
    """(tokenizer, model, scorer, roll, rewards): one sampled group per prompt with mixed rewards."""
    from torchrl.modules.llm import TransformersWrapper
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=pad, eos_token_id=eos, bos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()  # eval: no dropout, sampling and scoring agree

    policy = TransformersWrapper(
        model, tokenizer=tokenizer, input_mode="tokens", generate=True, return_log_probs=True, pad_output=True,
        num_samples=G, generate_kwargs=dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0,
                                            bad_words_ids=[[pad]]))  # no pad inside a completion
    scorer = TransformersWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=False, pad_output=True)

    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    prompts = TensorDict({"tokens": {"prompt": enc["input_ids"]},
                          "masks": {"all_attention_mask": enc["attention_mask"].bool()}}, batch_size=[len(PROMPTS)])

    # ---- rollout: sample until some group has mixed rewards (else every advantage is 0)
    for attempt in range(10):
        with torch.no_grad():
            roll = policy(prompts.copy()).reshape(-1)  # [B = 2 * G]
        texts = tokenizer.batch_decode(roll["tokens", "response"], skip_special_tokens=True)
        rewards = torch.tensor([verifier(t) for t in texts])  # [B]
        if (rewards.reshape(-1, G).std(-1) > 0).any():
            break
    else:
        pytest.fail("no group with mixed rewards in 10 rollouts")
    return tokenizer, model, scorer, roll, rewards


def test_grpo_lambda_end_to_end(rollout):
    tokenizer, model, scorer, roll, rewards = rollout
    B = rewards.numel()

    batch = TensorDict({"tokens": {"full": roll["tokens", "full"], "prompt": roll["tokens", "prompt"]},
                        "masks": {"all_attention_mask": roll["masks", "all_attention_mask"]},
                        "reward": rewards.reshape(B, 1, 1)}, batch_size=[B])
    credit = TensorDictSequential(CriticFreeTD(group_size=G), ClampNegative(clamp_min=-0.1))
    batch = credit(batch)  # advantage [B, 1, 1]
    adv = batch["advantage"]
    assert adv.shape == (B, 1, 1) and adv.min() >= -0.1 and (adv != 0).any()

    # ---- old log-probs: re-scored with the sampling weights. The generation path returns 0.0 for
    # the first response token (a TorchRL convention); the trace would carry that fake ratio down
    # the whole sequence, so the old log-probs are recomputed
    with torch.no_grad():
        old = scorer(batch.copy())["log_probs", "full"]  # [B, T]
    P = batch["tokens", "prompt"].shape[-1]
    resp_mask = batch["masks", "all_attention_mask"].clone()  # [B, T]
    resp_mask[:, :P] = False
    gen_lp = roll["log_probs", "response"]  # [B, R]
    assert (gen_lp[:, 0] == 0).all()
    valid = resp_mask[:, P + 1:]  # [B, R - 1]
    torch.testing.assert_close(gen_lp[:, 1:][valid], old[:, P + 1:][valid], rtol=1e-4, atol=1e-4)
    batch["log_probs"] = {"full": old}

    # ---- GRPO-lambda update
    loss_fn = GRPOLambdaLoss(scorer, style=DecayStyle("recent", gamma=1.0, lam=0.99), clamp_min=None,
                             entropy_coeff=1e-3)
    out = loss_fn(batch.clone())
    # ratio 1: the loss is -token_mean(A) over the response tokens; nothing is clipped
    a_tok = adv.reshape(B, 1).expand(resp_mask.shape)
    torch.testing.assert_close(out.loss_objective, aggregate(-a_tok, resp_mask, "token-mean"), rtol=1e-5, atol=1e-6)
    assert out.traced_clip_fraction.item() == 0.0 and out.trace_abs_mean.item() < 1e-5
    total = out.loss_objective + out.loss_entropy
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # no decay: only the gradient moves them
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])]
    assert len(moved) >= len(params) // 2, moved

    # ---- after the step: the ratio moved off 1, the trace is active, the surrogate went down
    with torch.no_grad():
        after = loss_fn(batch.clone())
    assert after.trace_abs_mean.item() > 0
    assert torch.isfinite(after.loss_objective) and torch.isfinite(after.ESS)
    assert after.loss_objective.item() < out.loss_objective.item()


def test_credit_method_from_registry_end_to_end(rollout):
    """--credit prefix-gae-clamp: PrefixGAE -> ClampNegative from the name, per-token [B, T, 1]
    advantages into GRPOLambdaLoss.from_credit, an optimizer step, and the surrogate goes down."""
    from creditlib.credit import get_credit
    from creditlib.modules import credit_pipeline

    tokenizer, model, scorer, roll, rewards = rollout
    B = rewards.numel()
    P = roll["tokens", "prompt"].shape[-1]
    resp_mask = roll["masks", "all_attention_mask"].clone()  # [B, T]
    resp_mask[:, :P] = False
    batch = TensorDict({"tokens": {"full": roll["tokens", "full"], "prompt": roll["tokens", "prompt"]},
                        "masks": {"all_attention_mask": roll["masks", "all_attention_mask"]},
                        "resp_mask": resp_mask, "reward": rewards.reshape(B, 1, 1)}, batch_size=[B])
    method = get_credit("prefix-gae-clamp")
    batch = credit_pipeline(method, group_size=G, tokens_key=("tokens", "full"), mask_key="resp_mask",
                            keepdim=True)(batch)
    adv = batch["advantage"]  # [B, T, 1]
    want = method.advantages(rewards, resp_mask, tokens=roll["tokens", "full"], group_size=G)  # [B, T]
    torch.testing.assert_close(adv.squeeze(-1), want)
    assert adv.min() >= -0.1 and (adv != 0).any() and (adv[~resp_mask] == 0).all()
    with torch.no_grad():
        batch["log_probs"] = {"full": scorer(batch.copy())["log_probs", "full"]}  # ratio 1

    loss_fn = GRPOLambdaLoss.from_credit(method, scorer, entropy_coeff=1e-3)
    out = loss_fn(batch.clone())
    torch.testing.assert_close(out.loss_objective, aggregate(-adv.squeeze(-1), resp_mask, "token-mean"),
                               rtol=1e-5, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    opt.zero_grad()
    (out.loss_objective + out.loss_entropy).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    opt.step()
    with torch.no_grad():
        after = loss_fn(batch.clone())
    assert torch.isfinite(after.loss_objective) and after.loss_objective.item() < out.loss_objective.item()
