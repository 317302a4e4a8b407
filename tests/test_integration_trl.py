"""GRPO-lambda inside TRL's real GRPOTrainer (trl 1.16, CPU).

A tiny Qwen2 (built from a config, saved to a temp dir), an offline character-level tokenizer
(`tokenizers` + `PreTrainedTokenizerFast`), a toy verifiable reward ("the completion contains the
answer digit") and a `datasets.Dataset` of "a+b=" prompts. Checks:

(a) with gamma*lam = 0 and no clamp, GRPOLambdaTrainer's loss and gradients equal stock
    GRPOTrainer's on the same batch, for every TRL loss type and the main options;
(b) with the trace, they equal creditlib's plain-tensor `grpo_lambda_loss` on the same log-probs;
(c) the clamp acts on TRL's advantages, and real training steps run and change the parameters.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl", reason="TRL is the optional extra creditlib[trl]")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from creditlib import DecayStyle  # noqa: E402
from creditlib.integrations.trl import GRPOLambdaConfig, GRPOLambdaTrainer  # noqa: E402
from creditlib.losses.functional import grpo_lambda_loss  # noqa: E402

G = 4  # completions per prompt
N_PROMPTS = 2
B = G * N_PROMPTS
MAX_LEN = 8  # max_completion_length


# ----------------------------------------------------------------------------- fixtures
def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in "0123456789+= ":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def answer_reward(completions, answer, **kwargs):
    """Verifiable reward: 1 if the completion contains the answer digit, else 0."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_integration")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model_dir = str(root / "tiny-qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)  # ~19k parameters
    tok.save_pretrained(model_dir)
    pairs = [(a, b) for a in range(4) for b in range(4)][:8]
    ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs],
                            "answer": [str((a + b) % 10) for a, b in pairs]})
    return {"root": root, "tok": tok, "model": model_dir, "ds": ds}


def _args(env, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(env["root"] / "out"), per_device_train_batch_size=B, num_generations=G,
                max_completion_length=MAX_LEN, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, logging_steps=1,
                activation_checkpointing=True)  # TRL's default, by its current name (no deprecation warning)
    base.update(kw)
    return cls(**base)


def _trainer(env, cls, args):
    return cls(model=env["model"], reward_funcs=answer_reward, args=args, train_dataset=env["ds"],
               processing_class=env["tok"])


def _rows(env):
    ds = env["ds"]
    return [ds[i] for i in range(N_PROMPTS) for _ in range(G)]  # what TRL's RepeatSampler yields


@pytest.fixture(scope="module")
def batch(env):
    """One real TRL batch (generation, rewards, advantages, reference log-probs), made off-policy."""
    trainer = _trainer(env, GRPOTrainer, _args(env, beta=0.04))  # beta > 0: ref log-probs in the batch
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(_rows(env))
    mask = inputs["completion_mask"].bool()  # [B, T]
    assert mask.sum() > B and (inputs["advantages"] != 0).any(), "the toy batch must carry a learning signal"
    with torch.no_grad():
        logps = _logps(trainer, trainer.model, inputs)  # [B, T]
    g = torch.Generator().manual_seed(1)
    # An older policy than the current one: ratios != 1, some outside the clip range.
    inputs["old_per_token_logps"] = logps + 0.25 * torch.randn(logps.shape, generator=g)  # [B, T]
    return inputs


def _logps(trainer, model, inputs):
    """TRL's own (untraced) per-token log-probs of the completion tokens, [B, T]."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, model, ids, att, inputs["completion_ids"].size(1))
    return logps


def _loss_and_grads(trainer, inputs):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; we call compute_loss directly
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_grads_close(ga, gb, rtol=1e-5, atol=1e-7):
    assert ga.keys() == gb.keys() and len(ga) > 0
    total = sum(float(g.norm()) for g in ga.values())
    assert total > 0, "gradients are all zero: the comparison would be vacuous"
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def _with_tool_mask(inputs):
    out = dict(inputs)
    tool = torch.ones_like(inputs["completion_mask"])  # [B, T]
    tool[::2, 2:4] = 0  # a "tool result" inside every other completion
    out["tool_mask"] = tool
    return out


# ----------------------------------------------------------------------------- (a) identity = stock TRL
IDENTITY_CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo", delta=1.5),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "sapo": dict(loss_type="sapo"),
    "vespo": dict(loss_type="vespo"),
    "grpo-sequence-is": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "grpo-kl-tool-mask": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "dapo-opsm-entropy": dict(loss_type="dapo", off_policy_mask_threshold=0.02, top_entropy_quantile=0.5,
                              entropy_coef=0.01),
}


@pytest.mark.parametrize("case", list(IDENTITY_CASES))
def test_identity_trace_equals_stock_trl(env, batch, case):
    kw = IDENTITY_CASES[case]
    inputs = _with_tool_mask(batch) if "tool" in case else batch
    stock = _trainer(env, GRPOTrainer, _args(env, **kw))
    lam = _trainer(env, GRPOLambdaTrainer,
                   _args(env, GRPOLambdaConfig, trace_style="recent", trace_gamma=1.0, trace_lam=0.0,
                         clamp_min=None, **kw))
    loss_s, grads_s = _loss_and_grads(stock, inputs)
    loss_l, grads_l = _loss_and_grads(lam, inputs)
    torch.testing.assert_close(loss_l, loss_s, rtol=1e-5, atol=1e-7)
    _assert_grads_close(grads_l, grads_s)


def test_identity_requires_the_trace_path(env, batch):
    """With lam > 0 the same comparison must fail: (a) is not vacuous."""
    stock = _trainer(env, GRPOTrainer, _args(env))
    lam = _trainer(env, GRPOLambdaTrainer, _args(env, GRPOLambdaConfig, trace_lam=0.9, clamp_min=None))
    _, grads_s = _loss_and_grads(stock, batch)
    _, grads_l = _loss_and_grads(lam, batch)
    diff = max(float((grads_s[n] - grads_l[n]).abs().max()) for n in grads_s)
    assert diff > 1e-4


# ----------------------------------------------------------------------------- (b) trace = plain-tensor loss
TRACE_CASES = {
    # name: (TRL config, DecayStyle, aggregation of the plain loss, scale factor, tool mask)
    "grpo-recent": (dict(loss_type="grpo"), DecayStyle("recent", 1.0, 0.9), "seq-mean-token-mean", None, False),
    "bnpo-both-eps": (dict(loss_type="bnpo"), DecayStyle("both", 1.0, 0.8, 0.05), "token-mean", None, False),
    # TRL's dr_grpo divides the token sum by B * max_completion_length: the mean over sequences / S
    "dr_grpo-recent-eps": (dict(loss_type="dr_grpo"), DecayStyle("recent", 0.95, 0.9, 0.1),
                           "seq-mean-token-sum-norm", MAX_LEN, False),
    "dapo-recent-cliphigh": (dict(loss_type="dapo", epsilon_high=0.28), DecayStyle("recent", 1.0, 0.99),
                             "token-mean", None, False),
    "luspo-both": (dict(loss_type="luspo"), DecayStyle("both", 1.0, 0.9), "seq-mean-token-sum", None, False),
    "grpo-kl-tool-mask": (dict(loss_type="grpo", beta=0.04), DecayStyle("recent", 1.0, 0.9),
                          "seq-mean-token-mean", None, True),
}


@pytest.mark.parametrize("case", list(TRACE_CASES))
def test_trace_equals_plain_tensor_loss(env, batch, case):
    kw, style, aggregation, scale, tool = TRACE_CASES[case]
    inputs = _with_tool_mask(batch) if tool else batch
    trainer = _trainer(env, GRPOLambdaTrainer,
                       _args(env, GRPOLambdaConfig, trace_style=style.style, trace_gamma=style.gamma,
                             trace_lam=style.lam, trace_eps=style.eps, clamp_min=None, **kw))
    assert trainer.trace_style == style
    loss_t, grads_t = _loss_and_grads(trainer, inputs)

    model = trainer.model
    model.zero_grad(set_to_none=True)
    mask = inputs["completion_mask"].bool()  # [B, T]
    if tool:
        mask = mask & inputs["tool_mask"].bool()
    logp = _logps(trainer, model, inputs)  # [B, T], untraced, with grad
    loss_p, metrics = grpo_lambda_loss(
        logp, inputs["old_per_token_logps"], inputs["advantages"], mask, style,
        clip_eps=(trainer.epsilon_low, trainer.epsilon_high), clamp_min=None, aggregation=aggregation,
        loss_scale_factor=scale, ref_logp=inputs.get("ref_per_token_logps") if trainer.beta else None,
        kl_coef=trainer.beta)
    loss_p.backward()
    grads_p = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert float(metrics["traced_clip_fraction"]) > 0  # off-policy enough that the clip matters
    torch.testing.assert_close(loss_t, loss_p.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads_t, grads_p, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- (c) clamp and real training
def test_clamp_on_trl_advantages(env):
    stock = _trainer(env, GRPOTrainer, _args(env))
    lam = _trainer(env, GRPOLambdaTrainer, _args(env, GRPOLambdaConfig, trace_lam=0.9, clamp_min=-0.1))
    stock.model.train()  # as in Trainer's loop (the metrics go to the "train" bucket)
    lam.model.train()
    torch.manual_seed(3)
    out_s = stock._generate_and_score_completions(_rows(env))
    torch.manual_seed(3)
    out_l = lam._generate_and_score_completions(_rows(env))
    assert torch.equal(out_s["completion_ids"], out_l["completion_ids"])  # same generation
    adv_s = out_s["advantages"]  # [B]
    assert (adv_s < -0.1).any(), "the batch must contain advantages below the clamp"
    torch.testing.assert_close(out_l["advantages"], adv_s.clamp(min=-0.1), rtol=0, atol=0)
    frac = lam._metrics["train"]["creditlib/clamped_frac"][-1]
    assert frac == pytest.approx(float((adv_s < -0.1).float().mean()))


def test_real_training_steps_change_parameters(env):
    args = _args(env, GRPOLambdaConfig, trace_style="both", trace_lam=0.95, trace_eps=0.01, clamp_min=-0.1,
                 max_steps=2, num_iterations=2, learning_rate=5e-2, beta=0.02)
    trainer = _trainer(env, GRPOLambdaTrainer, args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "creditlib/clamped_frac" in logs[0]  # step 0 generates; step 1 reuses it (num_iterations=2)


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("field, value, match", [
    ("trace_lam", 1.5, "trace_lam"),
    ("trace_gamma", -0.1, "trace_gamma"),
    ("trace_eps", 2.0, "trace_eps"),
    ("trace_style", "oldest", "trace_style"),
    ("clamp_min", 0.3, "clamp_min"),
])
def test_config_rejects_bad_values(env, field, value, match):
    with pytest.raises(ValueError, match=match):
        _args(env, GRPOLambdaConfig, **{field: value})


def test_trainer_rejects_plain_grpo_config(env):
    with pytest.raises(ValueError, match="GRPOLambdaConfig"):
        _trainer(env, GRPOLambdaTrainer, _args(env))


def test_trainer_refuses_liger_grpo_loss(env):
    args = _args(env, GRPOLambdaConfig)
    args.use_liger_loss = True  # the TRL < 1.0 flag whose fused loss bypasses _compute_loss
    with pytest.raises(ValueError, match="Liger"):
        _trainer(env, GRPOLambdaTrainer, args)


# ============================================================================= every credit method (CreditConfig)
from creditlib import functional as CF  # noqa: E402
from creditlib.ops.prefix.naive import prefix_td_naive  # noqa: E402
from creditlib.credit import CreditMethod, get_credit, register_credit  # noqa: E402
from creditlib.integrations.trl import CreditConfig, CreditMixin, CreditTrainer  # noqa: E402


def _credit(env, name, **kw):
    return _trainer(env, CreditTrainer, _args(env, CreditConfig, credit=name, **kw))


def _trl_rewards(trainer, n):
    """The rewards TRL itself logged for the last generated batch, [n] (one reward function)."""
    return torch.tensor(list(trainer._logs["rewards"]["answer_reward"])[-n:], dtype=torch.float32)


def test_credit_config_selects_registered_methods(env):
    for name in ("grpo", "clamp", "grpo-lambda", "grpo-lambda-norm", "gspo", "prefix-gae", "entropy-80-20"):
        args = _args(env, CreditConfig, credit=name)
        assert args.credit_method() is get_credit(name)
    with pytest.raises(ValueError, match="credit: unknown credit method 'prefix-gea'.*did you mean"):
        _args(env, CreditConfig, credit="prefix-gea")
    trainer = _credit(env, "prefix-gae-clamp")
    assert trainer.credit_method is get_credit("prefix-gae-clamp") and trainer.clamp_min == -0.1
    assert trainer.trace_style is None


def test_credit_config_refuses_contradictory_trl_options(env):
    with pytest.raises(ValueError, match="top_entropy_quantile=0.5 contradicts"):
        _args(env, CreditConfig, credit="entropy-80-20", top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="scale_rewards='none' contradicts"):
        _args(env, CreditConfig, credit="prefix-gae", scale_rewards="none")
    with pytest.raises(ValueError, match="scale_rewards='batch' cannot be combined"):
        _args(env, CreditConfig, credit="prefix-gae", scale_rewards="batch")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        _args(env, CreditConfig, credit="prefix-gae-lambda", multi_objective_aggregation="normalize_then_sum")
    assert _args(env, CreditConfig, credit="entropy-80-20").top_entropy_quantile == 0.2


def test_prefix_gae_sets_per_token_advantages_in_the_scoring_step(env):
    """prefix-gae-clamp: TRL's batch carries [B, T] advantages = GAE(1, 1) over the trie-walk TD error."""
    trainer = _credit(env, "prefix-gae-clamp", temperature=0.7)  # cooler sampling: more shared prefixes
    trainer.model.train()
    torch.manual_seed(5)
    out = trainer._generate_and_score_completions(_rows(env))
    ids, mask = out["completion_ids"], out["completion_mask"].bool()  # [B, T]
    rewards = _trl_rewards(trainer, B)  # [B]
    delta = prefix_td_naive(ids, mask, rewards.double(), G)  # [B, T] plain definition
    expected = CF.traced_credit(delta, mask, DecayStyle("recent", 1.0, 1.0)).clamp(min=-0.1).float()
    adv = out["advantages"]
    assert adv.shape == ids.shape and adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert bool((adv[~mask] == 0).all())
    assert (adv != 0).any(), "the toy batch must carry a learning signal"
    varies = [(adv[i][mask[i]].max() - adv[i][mask[i]].min()).item() > 1e-6 for i in range(B)]
    assert any(varies), "some completion must get different credit on different tokens"
    # with gamma = lam = 1 every row's first token carries the RLOO advantage (R_i - mean_{j!=i} R_j) / s
    unclamped = CF.traced_credit(delta, mask, DecayStyle("recent", 1.0, 1.0))  # [B, T]
    rloo = CF.group_advantage(rewards.double(), G, baseline="loo")  # [B]
    first = mask.long().argmax(dim=1)  # [B]
    torch.testing.assert_close(unclamped[torch.arange(B), first], rloo, rtol=1e-6, atol=1e-8)
    assert "creditlib/clamped_frac" in trainer._metrics["train"]


def test_per_token_advantages_reach_the_loss(env, batch):
    """TRL's loss with [B, T] advantages = creditlib's plain-tensor loss with the same advantages."""
    trainer = _credit(env, "prefix-gae", loss_type="grpo")
    inputs = dict(batch)
    g = torch.Generator().manual_seed(11)
    mask = inputs["completion_mask"].bool()  # [B, T]
    inputs["advantages"] = torch.randn(mask.shape, generator=g) * mask  # [B, T] per-token advantages
    loss_t, grads_t = _loss_and_grads(trainer, inputs)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    logp = _logps(trainer, model, inputs)  # [B, T]
    loss_p, _ = grpo_lambda_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], mask, None,
                                 clip_eps=(trainer.epsilon_low, trainer.epsilon_high), clamp_min=None,
                                 aggregation="seq-mean-token-mean")
    loss_p.backward()
    grads_p = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss_t, loss_p.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads_t, grads_p, rtol=1e-4, atol=1e-6)


class _RecordingCreditTrainer(CreditTrainer):
    """Records the advantages that reach TRL's loss during real training."""

    def _compute_loss(self, model, inputs):
        self.seen_advantages = getattr(self, "seen_advantages", []) + [inputs["advantages"].detach().clone()]
        return super()._compute_loss(model, inputs)


def test_prefix_gae_lambda_real_training_steps(env):
    args = _args(env, CreditConfig, credit="prefix-gae-lambda", max_steps=2, num_iterations=2, learning_rate=5e-2)
    trainer = _trainer(env, _RecordingCreditTrainer, args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert len(trainer.seen_advantages) == 2 and all(a.dim() == 2 for a in trainer.seen_advantages)


# GSPO: creditlib's sequence style on TRL's token-level loss vs TRL's importance_sampling_level="sequence".
# With one advantage per sequence they coincide for every loss type (cispo too: its log pi factor becomes
# log pi_old + the row's mean log-ratio, whose gradient summed over the row's tokens is TRL's). They part
# with per-token advantages under cispo (next test).
GSPO_CASES = {
    "grpo": dict(loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4),  # the GSPO paper's clip range
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "luspo": dict(loss_type="luspo"),
    "sapo": dict(loss_type="sapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "grpo-kl": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
}


@pytest.mark.parametrize("case", list(GSPO_CASES))
def test_gspo_sequence_style_equals_trl_sequence_level(env, batch, case):
    kw = GSPO_CASES[case]
    stock = _trainer(env, GRPOTrainer, _args(env, importance_sampling_level="sequence", **kw))
    gspo = _credit(env, "gspo", **kw)  # importance_sampling_level stays "token"
    assert gspo.importance_sampling_level == "token" and gspo.trace_style == DecayStyle("sequence")
    loss_s, grads_s = _loss_and_grads(stock, batch)
    loss_c, grads_c = _loss_and_grads(gspo, batch)
    torch.testing.assert_close(loss_c, loss_s, rtol=1e-5, atol=1e-7)
    _assert_grads_close(grads_c, grads_s, rtol=1e-4, atol=1e-7)


def test_gspo_differs_from_trl_sequence_level_for_cispo_with_per_token_advantages(env, batch):
    inputs = dict(batch)
    mask = inputs["completion_mask"].bool()  # [B, T]
    inputs["advantages"] = torch.randn(mask.shape, generator=torch.Generator().manual_seed(12)) * mask  # [B, T]
    stock = _trainer(env, GRPOTrainer, _args(env, importance_sampling_level="sequence", loss_type="cispo"))
    gspo = _credit(env, "gspo", loss_type="cispo")
    _, grads_s = _loss_and_grads(stock, inputs)
    _, grads_c = _loss_and_grads(gspo, inputs)
    assert max(float((grads_s[n] - grads_c[n]).abs().max()) for n in grads_s) > 1e-5


def test_normalised_trace_equals_plain_tensor_loss(env, batch):
    trainer = _credit(env, "grpo-lambda-norm", loss_type="dapo", epsilon_high=0.28)
    style = get_credit("grpo-lambda-norm").trace
    assert style.normalize and trainer.trace_style == style
    inputs = dict(batch)
    inputs["advantages"] = inputs["advantages"].clamp(min=-0.1)  # what the method's scoring step hands over
    loss_t, grads_t = _loss_and_grads(trainer, inputs)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    mask = inputs["completion_mask"].bool()  # [B, T]
    logp = _logps(trainer, model, inputs)  # [B, T]
    loss_p, metrics = grpo_lambda_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], mask, style,
                                       clip_eps=(trainer.epsilon_low, trainer.epsilon_high), clamp_min=None,
                                       aggregation="token-mean")
    loss_p.backward()
    grads_p = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss_t, loss_p.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads_t, grads_p, rtol=1e-4, atol=1e-6)


def test_entropy_80_20_is_trls_top_entropy_quantile(env, batch):
    """creditlib's entropy_mask keeps the same tokens as TRL's helper; the loss is TRL's top_entropy_quantile."""
    trainer = _credit(env, "entropy-80-20")
    assert trainer.top_entropy_quantile == 0.2
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        _, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, att, batch["completion_ids"].size(1), compute_entropy=True)  # [B, T]
    mask = batch["completion_mask"].bool()  # [B, T]
    g = torch.Generator().manual_seed(2)
    ties = (torch.rand(mask.shape, generator=g) * 4).floor() / 4  # [B, T] many equal values
    for e in (ent, ties):
        for q in (0.2, 0.5, 1.0):
            ours = CF.entropy_mask(e, mask, q)
            theirs = trainer.get_high_entropy_mask(e, mask, 1 - q)
            assert torch.equal(ours, theirs), q
    stock = _trainer(env, GRPOTrainer, _args(env, top_entropy_quantile=0.2))
    loss_s, grads_s = _loss_and_grads(stock, batch)
    loss_c, grads_c = _loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss_c, loss_s, rtol=0, atol=0)
    _assert_grads_close(grads_c, grads_s, rtol=0, atol=0)


def test_rloo_method_from_the_registry(env):
    method = register_credit(CreditMethod("test-rloo-clamp", baseline="loo", clamp_min=-0.2,
                                          description="RLOO with a clamp (test)"), overwrite=True)
    trainer = _credit(env, method.name)
    trainer.model.train()
    torch.manual_seed(3)
    out = trainer._generate_and_score_completions(_rows(env))
    r = _trl_rewards(trainer, B).view(N_PROMPTS, G)  # [P, G]
    loo = (r.sum(1, keepdim=True) - r) / (G - 1)  # [P, G] mean of the others
    expected = ((r - loo) / (r.std(1, keepdim=True) + 1e-4)).reshape(B).clamp(min=-0.2)  # [B]
    assert out["advantages"].shape == (B,)
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-5, atol=1e-6)


def test_unscorable_completions_get_zero_and_stay_out_of_baselines(env):
    calls = {"n": 0}

    def partial_reward(completions, answer, **kwargs):  # declines to score the first completion
        calls["n"] += 1
        return [None if i == 0 else (1.0 if a in c else 0.0) for i, (c, a) in enumerate(zip(completions, answer))]

    trainer = CreditTrainer(model=env["model"], reward_funcs=partial_reward, processing_class=env["tok"],
                            args=_args(env, CreditConfig, credit="prefix-gae"), train_dataset=env["ds"])
    trainer.model.train()
    torch.manual_seed(4)
    out = trainer._generate_and_score_completions(_rows(env))
    assert calls["n"] == 1
    ids, mask = out["completion_ids"], out["completion_mask"].bool()
    r = torch.tensor(list(trainer._logs["rewards"]["partial_reward"])[-B:], dtype=torch.float64)  # [B], r[0] is NaN
    assert math.isnan(r[0])
    adv = out["advantages"]
    assert bool((adv[0] == 0).all())
    keep = torch.arange(1, B)  # row 0 forms its own group: the rest as TRL's groups
    gid = torch.arange(B)[keep] // G
    delta = prefix_td_naive(ids[keep], mask[keep], r[keep], group_ids=gid)
    expected = CF.traced_credit(delta, mask[keep], DecayStyle("recent", 1.0, 1.0)).float()
    torch.testing.assert_close(adv[keep], expected, rtol=1e-5, atol=1e-6)


def test_async_grpo_trainer_is_refused(env):
    async_mod = pytest.importorskip("trl.experimental.async_grpo")

    class AsyncCredit(CreditMixin, async_mod.AsyncGRPOTrainer):
        pass

    with pytest.raises(ValueError, match="AsyncGRPOTrainer.*not a trl.GRPOTrainer|not a trl.GRPOTrainer"):
        AsyncCredit(model=env["model"], reward_funcs=answer_reward, args=None, train_dataset=env["ds"])


_TWO_PROCESS_WORKER = r'''
import os, sys, torch
sys.path[:0] = [os.environ["CREDITLIB_ROOT"], os.path.join(os.environ["CREDITLIB_ROOT"], "tests")]
from datasets import Dataset
from test_integration_trl import answer_reward
from transformers import AutoTokenizer
from creditlib import DecayStyle, functional as F
from creditlib.ops.prefix.naive import prefix_td_naive
from creditlib.integrations.trl import CreditConfig, CreditTrainer

model_dir, out_dir = sys.argv[1], sys.argv[2]
G = 8  # one group of 8 spans both processes (4 rows each)
ds = Dataset.from_dict({"prompt": ["1+2=", "3+1="], "answer": ["3", "4"]})
args = CreditConfig(output_dir=out_dir, credit="prefix-gae-clamp", num_generations=G, per_device_train_batch_size=4,
                    max_completion_length=8, report_to="none", use_cpu=True, bf16=False, seed=0, temperature=0.7)
tr = CreditTrainer(model=model_dir, reward_funcs=answer_reward, args=args, train_dataset=ds,
                   processing_class=AutoTokenizer.from_pretrained(model_dir))
acc = tr.accelerator
assert acc.num_processes == 2
tr.model.train()
torch.manual_seed(10 + acc.process_index)  # different completions on each process
out = tr._generate_and_score_completions([ds[0]] * 4)
ids, mask = out["completion_ids"], out["completion_mask"].bool()  # [4, T] local
all_ids = acc.gather(acc.pad_across_processes(ids, dim=1))  # [8, T']
all_mask = acc.gather(acc.pad_across_processes(mask.to(torch.uint8), dim=1)).bool()  # [8, T']
rewards = torch.tensor(list(tr._logs["rewards"]["answer_reward"])[-G:], dtype=torch.float64)  # TRL's, gathered
delta = prefix_td_naive(all_ids, all_mask, rewards, G)  # [8, T'] plain definition over the whole group
expected = F.traced_credit(delta, all_mask, DecayStyle("recent", 1.0, 1.0)).clamp(min=-0.1).float()
i = acc.process_index
torch.testing.assert_close(out["advantages"], expected[4 * i: 4 * (i + 1), : ids.shape[1]], rtol=1e-5, atol=1e-6)
print(f"rank {i} ok", flush=True)
'''


def test_prefix_gae_with_groups_spanning_two_processes(env, tmp_path):
    """torchrun, 2 CPU processes (gloo): a group's completions sit on both; each process gets its rows
    of the whole group's prefix-tree GAE."""
    import subprocess
    import sys
    from pathlib import Path

    worker = tmp_path / "worker.py"
    worker.write_text(_TWO_PROCESS_WORKER)
    root = str(Path(__file__).resolve().parents[1])
    run_env = {**os.environ, "CREDITLIB_ROOT": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), env["model"], str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=run_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2


# ----------------------------------------------------------------------------- mixin order, logging, warnings
@pytest.mark.parametrize("mixin", ["CreditMixin", "GRPOLambdaMixin"])
def test_wrong_mixin_order_is_refused_at_class_definition(mixin):
    """class T(GRPOTrainer, CreditMixin) used to train plain GRPO silently (loss 0, no creditlib metrics)."""
    import creditlib.integrations.trl as ctrl

    Mixin = getattr(ctrl, mixin)
    with pytest.raises(TypeError, match=rf"{mixin} must come before GRPOTrainer.*class T\({mixin}, GRPOTrainer\)"):
        type("T", (GRPOTrainer, Mixin), {})

    class MyGRPO(GRPOTrainer):  # a user's own GRPOTrainer subclass, mixin last: refused too
        pass

    with pytest.raises(TypeError, match="must come before GRPOTrainer"):
        type("T2", (MyGRPO, Mixin), {})
    ok = type("T3", (Mixin, MyGRPO), {})  # the right order, and subclasses of it, are accepted
    assert issubclass(type("T4", (ok,), {}), GRPOTrainer)


def test_every_run_prints_the_active_credit_method_once(env, capsys):
    capsys.readouterr()
    trainer = _trainer(env, CreditTrainer, _args(env, CreditConfig, credit="prefix-gae-clamp", max_steps=1))
    out = capsys.readouterr().out
    assert out.count("creditlib: CreditTrainer trains with credit method prefix-gae-clamp: advantage=prefix_td") == 1, out
    trainer.train()
    assert "trains with credit method" not in capsys.readouterr().out  # once per run, not per step


@pytest.mark.parametrize("cls", ["CreditConfig", "GRPOLambdaConfig"])
def test_configs_raise_no_gradient_checkpointing_deprecation(env, cls):
    """TRL's base config defaults the deprecated `gradient_checkpointing` to True, which made
    transformers warn on every config; creditlib's configs set `activation_checkpointing` instead."""
    import warnings

    import creditlib.integrations.trl as ctrl

    Cfg = getattr(ctrl, cls)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = _args(env, Cfg, activation_checkpointing=None)  # creditlib's default
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        off = _args(env, Cfg, activation_checkpointing=False)
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the old name: transformers' own rule
        old = _args(env, Cfg, activation_checkpointing=None, gradient_checkpointing=False)
    assert old.activation_checkpointing is False


def test_trl_default_credit_is_the_librarys_default():
    """CreditConfig's default credit method is RecipeConfig's (grpo-lambda); recipes/grpo.py, the
    baseline recipe, chooses grpo (docs/trl.md says so)."""
    from dataclasses import fields

    from creditlib.rl.config import RecipeConfig

    default = {f.name: f.default for f in fields(CreditConfig)}["credit"]
    assert default == RecipeConfig().credit == "grpo-lambda"
