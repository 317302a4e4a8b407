"""GRPO-lambda for verl: the policy loss and the advantage estimator.

Part 1 runs everywhere (verl is not needed): the functions through their public verl signature,
against creditlib's plain-tensor loss, including verl's global-batch aggregation (data parallel
ranks simulated by splitting a batch) and rollout importance weights.

Part 2 runs only where verl imports (it cannot be installed beside this project's pins: verl
0.9 needs tensordict <= 0.10, this project pins 0.14; verl <= 0.8 needs numpy < 2): the
registered functions through verl's own registry lookup, against verl's ``vanilla`` loss and
``grpo`` estimator, and through verl's ``compute_advantage``, its actor ``ppo_loss`` and
``VERL_USE_EXTERNAL_MODULES`` loading.

The multi-turn section tests the turn-level methods of the ``creditlib`` estimator: per-turn
rewards and state ids read from ``non_tensor_batch`` (part 1 with numpy object arrays, part 2 in
verl's ``DataProto``, ``compute_advantage`` and agent-loop batching).
Run them with ``PYTHONPATH=. python -m pytest tests/test_integration_verl.py`` in a verl environment
(tested: verl 0.9.1, torch 2.13.0+cpu, tensordict 0.10.0).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from creditlib import DecayStyle
from creditlib.integrations import verl as cv
from creditlib.losses.functional import aggregate, clipped_surrogate, grpo_lambda_loss, traced_log_ratio

BS, T = 6, 10
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
CFG = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
STYLE = DecayStyle("both", gamma=1.0, lam=0.9, eps=0.05)


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 7, 3, 9, 1, 5])  # [BS] right-padded responses
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [BS, T]
    old = -torch.rand(BS, T, generator=g, dtype=dtype) * 3  # [BS, T]
    new = (old + 0.3 * torch.randn(BS, T, generator=g, dtype=dtype)).requires_grad_(True)  # [BS, T]
    adv_seq = torch.tensor([1.2, -0.8, 0.4, -0.1, 0.9, -1.5], dtype=dtype)  # [BS]
    adv = adv_seq[:, None] * mask  # [BS, T], verl's token-level advantages
    return old, new, adv, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- part 1: no verl needed
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_equals_plain_tensor_loss(mode):
    old, new, adv, mask = _batch()
    loss, metrics = cv.grpo_lambda_policy_loss(old, new, adv, mask.long(), mode, CFG, None, style=STYLE)
    ref, ref_m = grpo_lambda_loss(new, old, adv, mask, STYLE, clip_eps=(0.2, 0.28), clamp_min=None,
                                  aggregation=mode)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, new), _grad(ref, new), rtol=1e-12, atol=1e-12)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float(ref_m["traced_clip_fraction"]))
    assert 0 < metrics["actor/pg_clipfrac"] < 1
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("mode", MODES)
def test_global_batch_info_matches_the_full_batch(mode):
    """Two data-parallel ranks (verl averages their gradients) = the loss on the whole batch."""
    old, new, adv, mask = _batch(1)
    S = 16.0  # loss_scale_factor (e.g. the generation budget)
    info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()), "global_batch_size": BS,
            "loss_scale_factor": S if mode == "seq-mean-token-sum-norm" else None}
    halves = (slice(0, 3), slice(3, BS))
    ranks = [cv.grpo_lambda_policy_loss(old[h], new[h], adv[h], mask[h], mode, {**CFG, "global_batch_info": info},
                                        style=STYLE)[0] for h in halves]
    dp_mean = (ranks[0] + ranks[1]) / 2  # what DDP/FSDP gradient averaging optimises
    full, _ = grpo_lambda_loss(new, old, adv, mask, STYLE, clip_eps=(0.2, 0.28), clamp_min=None,
                               aggregation=mode, loss_scale_factor=S if mode == "seq-mean-token-sum-norm" else None)
    torch.testing.assert_close(dp_mean, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(dp_mean, new), _grad(full, new), rtol=1e-12, atol=1e-12)


def test_token_sum_mode():
    old, new, adv, mask = _batch(2)
    loss, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "token-sum", CFG, style=STYLE)
    per_tok, _ = clipped_surrogate(traced_log_ratio(new, old, mask, STYLE), adv, (0.2, 0.28))  # [BS, T]
    torch.testing.assert_close(loss, (per_tok * mask).sum(), rtol=1e-12, atol=1e-12)


def test_rollout_is_weights_weight_the_per_token_loss():
    old, new, adv, mask = _batch(3)
    g = torch.Generator().manual_seed(4)
    w = torch.rand(BS, T, generator=g, dtype=torch.float64) * 2  # [BS, T] IS weights
    w[0, 3] = 0.0  # a rejected token
    w[~mask] = float("nan")  # padding may hold anything
    loss, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "seq-mean-token-mean", CFG, w, style=STYLE)
    z = traced_log_ratio(new, old, mask, STYLE)  # [BS, T]
    per_tok, _ = clipped_surrogate(z, adv, (0.2, 0.28))  # [BS, T]
    ref = aggregate(per_tok * w, mask, "seq-mean-token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, new), _grad(ref, new), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        cv.grpo_lambda_policy_loss(old, new, adv, mask, "token-mean", CFG, -torch.ones(BS, T), style=STYLE)


def test_style_comes_from_the_environment(monkeypatch):
    old, new, adv, mask = _batch(5)
    for k, v in {"CREDITLIB_TRACE_STYLE": "both", "CREDITLIB_TRACE_GAMMA": "1.0", "CREDITLIB_TRACE_LAM": "0.9",
                 "CREDITLIB_TRACE_EPS": "0.05"}.items():
        monkeypatch.setenv(k, v)
    assert cv.style_from_env() == STYLE
    from_env, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "token-mean", CFG)
    explicit, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "token-mean", CFG, style=STYLE)
    torch.testing.assert_close(from_env, explicit, rtol=0, atol=0)
    monkeypatch.setenv("CREDITLIB_TRACE_LAM", "1.7")
    with pytest.raises(ValueError, match="CREDITLIB_TRACE_LAM"):
        cv.style_from_env()
    monkeypatch.setenv("CREDITLIB_TRACE_LAM", "abc")
    with pytest.raises(ValueError, match="CREDITLIB_TRACE_LAM"):
        cv.style_from_env()
    monkeypatch.delenv("CREDITLIB_TRACE_LAM")
    monkeypatch.delenv("CREDITLIB_TRACE_STYLE")
    assert cv.style_from_env() == DecayStyle("recent", 1.0, 0.99, 0.05)


def test_bound_policy_loss_ignores_the_environment(monkeypatch):
    old, new, adv, mask = _batch(6)
    monkeypatch.setenv("CREDITLIB_TRACE_LAM", "0.3")
    bound = cv.make_policy_loss(STYLE)
    a, _ = bound(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
                 config=CFG, rollout_is_weights=None)  # verl calls with keywords
    b, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "token-mean", CFG, style=STYLE)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _group_rewards():
    index = np.array(["p0"] * 4 + ["p1"] * 4 + ["p2"], dtype=object)  # [9] prompt uids; p2 has one response
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # [9]
    lengths = torch.tensor([4, 6, 2, 5, 6, 3, 6, 1, 2])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()  # [9, 6]
    rewards = torch.zeros(9, 6)
    rewards[torch.arange(9), lengths - 1] = scores  # outcome reward on the last response token
    return rewards, mask, index, scores


@pytest.mark.parametrize("norm", [True, False])
def test_advantage_estimator_is_clamped_grpo(norm):
    rewards, mask, index, scores = _group_rewards()
    adv, ret = cv.grpo_lambda_advantage(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm,
                                        clamp_min=-0.1)
    expected = torch.zeros(9)
    for grp in (slice(0, 4), slice(4, 8)):  # by hand: (R - mean) / (std + eps), unbiased std
        s = scores[grp]
        expected[grp] = (s - s.mean()) / ((s.std() + 1e-6) if norm else 1.0)
    assert (expected < -0.1).any()
    expected = expected.clamp(min=-0.1)  # the singleton group p2 keeps advantage 0
    torch.testing.assert_close(adv, expected[:, None] * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, adv)


def test_advantage_clamp_from_environment_and_config(monkeypatch):
    rewards, mask, index, _ = _group_rewards()
    monkeypatch.setenv("CREDITLIB_CLAMP_MIN", "none")
    free, _ = cv.grpo_lambda_advantage(rewards, mask, index, config={"norm_adv_by_std_in_grpo": False})
    assert float(free.min()) == pytest.approx(-0.5)
    monkeypatch.setenv("CREDITLIB_CLAMP_MIN", "-0.25")
    clamped, _ = cv.grpo_lambda_advantage(rewards, mask, index, config={"norm_adv_by_std_in_grpo": False})
    torch.testing.assert_close(clamped, free.clamp(min=-0.25) * mask)
    monkeypatch.setenv("CREDITLIB_CLAMP_MIN", "0.5")
    with pytest.raises(ValueError, match="CREDITLIB_CLAMP_MIN"):
        cv.grpo_lambda_advantage(rewards, mask, index)
    with pytest.raises(ValueError, match="index"):
        cv.grpo_lambda_advantage(rewards, mask, None, clamp_min=None)


def test_register_without_verl_says_how_to_install():
    if cv.verl_available():
        pytest.skip("verl is installed here: registration is tested in part 2")
    with pytest.raises(ImportError, match=r"--no-deps creditlib"):
        cv.register()


# ----------------------------------------------------------------------------- part 2: verl's own registries
def _verl():
    """verl's core_algos, or skip: verl cannot be installed beside this project's pinned packages."""
    if not cv.verl_available():
        pytest.skip("verl not installed (verl 0.9 needs tensordict<=0.10; the lock pins 0.14): "
                    "run this file in a verl environment")
    from verl.trainer.ppo import core_algos

    return core_algos


def _actor_config(**kw):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                       clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0,
                       policy_loss=PolicyLossConfig(loss_mode="grpo_lambda"), **kw)


@pytest.mark.parametrize("mode", MODES + ("token-sum",))
def test_verl_registry_identity_equals_verl_vanilla(mode, monkeypatch):
    core = _verl()
    monkeypatch.setenv("CREDITLIB_TRACE_LAM", "0.0")  # gamma*lam = 0: plain PPO-clip
    cfg = _actor_config()
    fn = core.get_policy_loss_fn(cfg.policy_loss.loss_mode)
    assert fn is cv.grpo_lambda_policy_loss
    old, new, adv, mask = _batch(7, torch.float32)
    for info in ({}, {"dp_size": 2, "batch_num_tokens": int(mask.sum()) + 7, "global_batch_size": BS + 2,
                      "loss_scale_factor": 32}):
        cfg.global_batch_info.clear()
        cfg.global_batch_info.update(info)
        kw = dict(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                  config=cfg, rollout_is_weights=None)
        ours, m = fn(**kw)
        theirs, tm = core.get_policy_loss_fn("vanilla")(**kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_grad(ours, new), _grad(theirs, new), rtol=1e-5, atol=1e-7)
        assert m["actor/ppo_kl"] == pytest.approx(tm["actor/ppo_kl"], rel=1e-5, abs=1e-7)


def test_verl_registry_traced_loss(monkeypatch):
    core = _verl()
    for k, v in {"CREDITLIB_TRACE_STYLE": "both", "CREDITLIB_TRACE_LAM": "0.9", "CREDITLIB_TRACE_EPS": "0.05"}.items():
        monkeypatch.setenv(k, v)
    cfg = _actor_config()
    old, new, adv, mask = _batch(8)
    w = torch.rand(BS, T, dtype=torch.float64) + 0.5  # [BS, T]
    ours, _ = core.get_policy_loss_fn("grpo_lambda")(old_log_prob=old, log_prob=new, advantages=adv,
                                                      response_mask=mask, loss_agg_mode="seq-mean-token-mean",
                                                      config=cfg, rollout_is_weights=w)
    per_tok, _ = clipped_surrogate(traced_log_ratio(new, old, mask, STYLE), adv, (0.2, 0.28))
    ref = core.agg_loss(per_tok * w, mask, "seq-mean-token-mean")  # verl's own aggregation
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)


def test_verl_estimator_equals_grpo_then_clamp():
    core = _verl()
    rewards, mask, index, _ = _group_rewards()
    keep = slice(0, 8)  # verl gives singleton groups the raw score, creditlib 0: compare groups of 4
    ours_fn = core.get_adv_estimator_fn("grpo_lambda")
    assert ours_fn is cv.grpo_lambda_advantage
    theirs, _ = core.compute_grpo_outcome_advantage(rewards[keep], mask[keep], index[keep])
    ours, _ = ours_fn(token_level_rewards=rewards[keep], response_mask=mask[keep], index=index[keep], config=None,
                      clamp_min=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    clamped, _ = ours_fn(token_level_rewards=rewards[keep], response_mask=mask[keep], index=index[keep],
                         clamp_min=-0.1)
    torch.testing.assert_close(clamped, theirs.clamp(min=-0.1) * mask[keep], rtol=1e-5, atol=1e-6)


def test_verl_compute_advantage_call_site(monkeypatch):
    _verl()
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    monkeypatch.setenv("CREDITLIB_CLAMP_MIN", "-0.1")
    rewards, mask, index, _ = _group_rewards()
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": index})
    cfg = AlgoConfig(adv_estimator="grpo_lambda", norm_adv_by_std_in_grpo=True)
    out = compute_advantage(data, adv_estimator=cfg.adv_estimator, config=cfg)
    expected, _ = cv.grpo_lambda_advantage(rewards, mask, index, clamp_min=-0.1)
    torch.testing.assert_close(out.batch["advantages"], expected)
    assert float(out.batch["advantages"].min()) == pytest.approx(-0.1)


def test_verl_loads_the_module_in_a_fresh_process():
    """What a Ray worker does: VERL_USE_EXTERNAL_MODULES imports creditlib when verl is imported."""
    _verl()
    code = ("from verl.trainer.ppo import core_algos as c; "
            "print(c.get_policy_loss_fn('grpo_lambda').__module__, c.get_adv_estimator_fn('grpo_lambda').__name__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "creditlib.integrations.verl"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "creditlib.integrations.verl grpo_lambda_advantage" in out.stdout


def test_verl_actor_ppo_loss_call_site(monkeypatch):
    """verl's actor loss entry point (workers/utils/losses.ppo_loss), flat no-padding model output."""
    _verl()
    from tensordict import NonTensorData, TensorDict
    from verl.workers.utils.losses import ppo_loss

    for k, v in {"CREDITLIB_TRACE_STYLE": "both", "CREDITLIB_TRACE_LAM": "0.9", "CREDITLIB_TRACE_EPS": "0.05"}.items():
        monkeypatch.setenv(k, v)
    old, new, adv, mask = _batch(9, torch.float32)
    P = 3
    plen = torch.tensor([3, 2, 3, 1, 2, 3])  # [BS] left-padded prompts
    rlen = mask.sum(-1)  # [BS]
    att = torch.cat([torch.arange(P)[None] >= P - plen[:, None], mask], dim=1).long()  # [BS, P + T]
    # The model's flat output over prompt + response tokens; response token j's log-prob sits at
    # position prompt_len - 1 + j of its sequence (next-token prediction).
    flat = torch.cat([torch.cat([torch.zeros(int(p) - 1), new[i, : int(r)].detach(), torch.zeros(1)])
                      for i, (p, r) in enumerate(zip(plen, rlen))]).requires_grad_(True)  # [total_nnz]
    data = TensorDict({"prompts": torch.ones(BS, P, dtype=torch.long), "responses": torch.ones(BS, T, dtype=torch.long),
                       "attention_mask": att, "response_mask": mask.long(), "old_log_probs": old, "advantages": adv},
                      batch_size=[BS])
    data["dp_size"] = NonTensorData(1)
    data["batch_num_tokens"] = NonTensorData(None)
    data["global_batch_size"] = NonTensorData(None)
    cfg = _actor_config(loss_agg_mode="seq-mean-token-mean")
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
    assert "actor/pg_clipfrac" in metrics and "actor/creditlib/trace_abs_mean" in metrics
    ref, _ = grpo_lambda_loss(new, old, adv, mask, STYLE, clip_eps=(0.2, 0.28), clamp_min=None,
                              aggregation="seq-mean-token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    g_flat, g_ref = _grad(loss, flat), _grad(ref, new)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (plen + rlen).cumsum(0)[:-1]]) + plen - 1  # [BS]
    for i in range(BS):
        torch.testing.assert_close(g_flat[starts[i]: starts[i] + rlen[i]], g_ref[i, : rlen[i]], rtol=1e-5, atol=1e-7)


# ============================================================================= every credit method
from creditlib import functional as CF  # noqa: E402
from creditlib.ops.prefix.naive import prefix_td_naive  # noqa: E402
from creditlib.credit import get_credit  # noqa: E402

_CREDIT_VARS = ("CREDITLIB_CREDIT", "CREDITLIB_TRACE_STYLE", "CREDITLIB_TRACE_GAMMA", "CREDITLIB_TRACE_LAM",
                "CREDITLIB_TRACE_EPS", "CREDITLIB_TRACE_NORMALIZE", "CREDITLIB_CLAMP_MIN")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _CREDIT_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env_vars, style", [
    ({"CREDITLIB_TRACE_NORMALIZE": "1", "CREDITLIB_TRACE_LAM": "0.9"}, DecayStyle("recent", 1.0, 0.9, normalize=True)),
    ({"CREDITLIB_TRACE_STYLE": "both", "CREDITLIB_TRACE_NORMALIZE": "true", "CREDITLIB_TRACE_EPS": "0.05"},
     DecayStyle("both", 1.0, 0.99, 0.05, normalize=True)),
    ({"CREDITLIB_TRACE_STYLE": "sequence"}, DecayStyle("sequence")),
    ({"CREDITLIB_CREDIT": "gspo"}, DecayStyle("sequence")),
    ({"CREDITLIB_CREDIT": "grpo-lambda-norm"}, get_credit("grpo-lambda-norm").trace),
])
def test_policy_loss_new_styles_from_the_environment(clean_env, env_vars, style):
    for k, v in env_vars.items():
        clean_env.setenv(k, v)
    assert cv.style_from_env() == style
    old, new, adv, mask = _batch(13)
    loss, _ = cv.grpo_lambda_policy_loss(old, new, adv, mask, "seq-mean-token-mean", CFG)
    ref, _ = grpo_lambda_loss(new, old, adv, mask, style, clip_eps=(0.2, 0.28), clamp_min=None,
                              aggregation="seq-mean-token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, new), _grad(ref, new), rtol=1e-12, atol=1e-12)


def test_credit_environment_variable(clean_env):
    clean_env.setenv("CREDITLIB_CREDIT", "grpo")
    assert cv.style_from_env().is_identity() and cv.clamp_min_from_env() is None
    clean_env.setenv("CREDITLIB_CREDIT", "prefix-gae-clamp")
    assert cv.clamp_min_from_env() == -0.1
    clean_env.setenv("CREDITLIB_TRACE_LAM", "0.5")
    with pytest.raises(ValueError, match="unset CREDITLIB_TRACE_LAM"):
        cv.style_from_env()
    clean_env.delenv("CREDITLIB_TRACE_LAM")
    clean_env.setenv("CREDITLIB_CREDIT", "entropy-80-20")
    with pytest.raises(ValueError, match="no entropies"):
        cv.style_from_env()
    clean_env.setenv("CREDITLIB_CREDIT", "gspoo")
    with pytest.raises(ValueError, match="CREDITLIB_CREDIT: unknown credit method.*did you mean 'gspo'"):
        cv.style_from_env()
    clean_env.delenv("CREDITLIB_CREDIT")
    clean_env.setenv("CREDITLIB_TRACE_NORMALIZE", "maybe")
    with pytest.raises(ValueError, match="CREDITLIB_TRACE_NORMALIZE"):
        cv.style_from_env()


def _prefix_batch():
    """Two prompts x 4 responses over a 3-token vocabulary (many shared prefixes), uids interleaved."""
    g = torch.Generator().manual_seed(21)
    bs, t = 8, 7
    responses = torch.randint(0, 3, (bs, t), generator=g)  # [bs, T]
    responses[1, :4] = responses[5, :4]  # rows 1 and 5 share a prompt and a 4-token prefix
    responses[3] = responses[7]  # identical responses
    lengths = torch.tensor([7, 5, 3, 7, 6, 7, 2, 7])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # [bs, T] right-padded
    index = np.array(["a", "b", "a", "b", "a", "b", "a", "b"], dtype=object)  # [bs] any order
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # [bs]
    rewards = torch.zeros(bs, t)
    rewards[torch.arange(bs), lengths - 1] = scores  # outcome reward on the last token
    return responses, mask, index, scores, rewards


@pytest.mark.parametrize("name", ["prefix-gae", "prefix-gae-clamp", "prefix-gae-lambda"])
def test_credit_estimator_prefix_gae_equals_the_trie_walk(clean_env, name):
    responses, mask, index, scores, rewards = _prefix_batch()
    clean_env.setenv("CREDITLIB_CREDIT", name)
    adv, ret = cv.credit_advantage(rewards, mask, index, responses=responses)
    m = get_credit(name)
    gid = torch.tensor([0 if u == "a" else 1 for u in index])
    delta = prefix_td_naive(responses, mask.bool(), scores.double(), group_ids=gid)  # [bs, T]
    expected = CF.traced_credit(delta, mask.bool(), DecayStyle("recent", m.gae_gamma, m.gae_lam))
    if m.clamp_min is not None:
        expected = expected.clamp(min=m.clamp_min)
    torch.testing.assert_close(adv, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, adv)
    assert not torch.allclose(adv[:, :1].expand_as(adv) * mask, adv), "credit must vary along some response"


def test_credit_estimator_group_methods_and_errors(clean_env):
    _, mask, index, scores, rewards = _prefix_batch()
    adv, _ = cv.credit_advantage(rewards, mask, index, method="clamp")
    gid = torch.tensor([0 if u == "a" else 1 for u in index])
    expected = CF.group_advantage(scores, group_ids=gid).clamp(min=-0.1)[:, None] * mask  # [bs, T]
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="needs the response token ids"):
        cv.credit_advantage(rewards, mask, index, method="prefix-gae")
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo=False contradicts"):
        cv.credit_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False, method="grpo")
    clean_env.setenv("CREDITLIB_CREDIT", "grpo")  # a bound estimator ignores the environment
    bound = cv.make_credit_estimator("prefix-gae-lambda")
    responses = _prefix_batch()[0]
    a, _ = bound(token_level_rewards=rewards, response_mask=mask, index=index, config=None, responses=responses)
    b, _ = cv.credit_advantage(rewards, mask, index, responses=responses, method="prefix-gae-lambda")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- with verl
def test_verl_gspo_equals_creditlib_sequence_style(clean_env):
    """verl's `gspo` loss (GSPO-token form) vs creditlib's sequence style, per-sequence advantages."""
    core = _verl()
    clean_env.setenv("CREDITLIB_CREDIT", "gspo")
    cfg = _actor_config()
    old, new, adv, mask = _batch(14)
    for mode in MODES + ("token-sum",):
        kw = dict(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                  config=cfg, rollout_is_weights=None)
        ours, _ = core.get_policy_loss_fn("grpo_lambda")(**kw)
        theirs, _ = core.get_policy_loss_fn("gspo")(**kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(ours, new), _grad(theirs, new), rtol=1e-9, atol=1e-12)


def test_verl_gspo_gradient_differs_with_per_token_advantages(clean_env):
    """GSPO-token sends each token's advantage to its own log-prob; the sequence style spreads it."""
    core = _verl()
    clean_env.setenv("CREDITLIB_CREDIT", "gspo")
    cfg = _actor_config()
    old, new, _, mask = _batch(15)
    adv = torch.randn(BS, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * mask  # [BS, T]
    kw = dict(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
              loss_agg_mode="seq-mean-token-mean", config=cfg, rollout_is_weights=None)
    ours, _ = core.get_policy_loss_fn("grpo_lambda")(**kw)
    theirs, _ = core.get_policy_loss_fn("gspo")(**kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)  # same value
    assert float((_grad(ours, new) - _grad(theirs, new)).abs().max()) > 1e-3  # different gradient


def _data_proto(responses, mask, index, rewards):
    from verl import DataProto

    return DataProto.from_dict(tensors={"responses": responses, "token_level_rewards": rewards,
                                        "response_mask": mask}, non_tensors={"uid": index})


def test_verl_compute_advantage_gives_the_estimator_the_response_ids(clean_env):
    _verl()
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    assert __import__("verl.trainer.ppo.core_algos", fromlist=["x"]).get_adv_estimator_fn("creditlib") is \
        cv.credit_advantage
    responses, mask, index, scores, rewards = _prefix_batch()
    clean_env.setenv("CREDITLIB_CREDIT", "prefix-gae-clamp")
    cfg = AlgoConfig(adv_estimator="creditlib")
    out = compute_advantage(_data_proto(responses, mask, index, rewards), adv_estimator="creditlib", config=cfg)
    expected, _ = cv.credit_advantage(rewards, mask, index, responses=responses)
    torch.testing.assert_close(out.batch["advantages"], expected)
    from verl import DataProto

    no_ids = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                                 non_tensors={"uid": index})
    with pytest.raises(ValueError, match="needs the response token ids"):
        compute_advantage(no_ids, adv_estimator="creditlib", config=cfg)


def _sessions():
    """verl V1 batch: 2 prompts x 2 sessions; some sessions have several outputs (turns)."""
    keys = ["p0_s0_0", "p0_s0_1", "p0_s1_0", "p1_s0_0", "p1_s1_0", "p1_s1_1", "p1_s1_2"]  # {uid}_{session}_{idx}
    index = np.array([k.split("_")[0] for k in keys], dtype=object)
    bs, t = len(keys), 5
    mask = torch.ones(bs, t, dtype=torch.long)
    mask[1, 3:] = 0
    mask[5, 2:] = 0
    final_score = {"p0_s0": 1.0, "p0_s1": 0.0, "p1_s0": 0.0, "p1_s1": 1.0}
    rewards = torch.zeros(bs, t)
    for i, k in enumerate(keys):  # the reward sits on the final output of each session
        s, j = k.rsplit("_", 1)
        if all(int(j) >= int(o.rsplit("_", 1)[1]) for o in keys if o.startswith(s + "_")):
            rewards[i, int(mask[i].sum()) - 1] = final_score[s]
    return keys, index, mask, rewards


@pytest.mark.parametrize("estimator, credit", [("grpo_lambda", None), ("creditlib", "clamp")])
def test_verl_v1_multi_output_sessions(clean_env, estimator, credit):
    """compute_advantage_for_multi_trajectories: verl scores each session's final output for its
    `grpo` only; creditlib's group estimators apply the same rule (then the clamp)."""
    _verl()
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories as multi

    keys, index, mask, rewards = _sessions()
    clean_env.setenv("CREDITLIB_CLAMP_MIN", "-0.1") if credit is None else clean_env.setenv("CREDITLIB_CREDIT", credit)

    def data():
        return DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                                   non_tensors={"uid": index})

    theirs = multi(data(), keys, adv_estimator="grpo", config=AlgoConfig(adv_estimator="grpo"),
                   norm_adv_by_std_in_grpo=True).batch["advantages"]  # [bs, T]
    ours = multi(data(), keys, adv_estimator=estimator, config=AlgoConfig(adv_estimator=estimator)).batch["advantages"]
    assert (theirs < -0.1).any()
    # verl's grpo: (R - mean) / (std + 1e-6); creditlib's method estimator uses 1e-4 (same up to that)
    torch.testing.assert_close(ours, theirs.clamp(min=-0.1) * mask, rtol=2e-4, atol=1e-6)
    assert ours[0, 0] == ours[1, 0] != 0  # two outputs of one session share its final output's advantage


def test_verl_v1_refuses_per_token_credit_on_multi_output_sessions(clean_env):
    _verl()
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories as multi

    keys, index, mask, rewards = _sessions()
    clean_env.setenv("CREDITLIB_CREDIT", "prefix-gae")
    d = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask,
                                     "responses": torch.zeros_like(mask)}, non_tensors={"uid": index})
    with pytest.raises(ValueError, match="cannot be broadcast"):
        multi(d, keys, adv_estimator="creditlib", config=AlgoConfig(adv_estimator="creditlib"))


# ============================================================================= multi-turn: per-turn credit
# verl's multi-turn rollouts (agent loop): response_mask is 1 on the model's tokens and 0 on tool
# responses / observations and padding; per-turn lists ride in non_tensor_batch as object arrays.
_ROWS = ("ppoopppoopo.",   # 3 turns, the outcome reward sits on a trailing tool token (verl: last response token)
         "pppooopp....",   # 2 turns
         "pooppoopppp.",   # 3 turns
         "ppppp.......",   # 1 turn
         "ppooop......",   # 2 turns
         "popopop.....")   # 4 turns
_UIDS = np.array(["a", "b", "a", "b", "a", "b"], dtype=object)  # [6] interleaved prompt groups
_OUTCOME = (1.0, 0.0, 1.0, 0.0, 0.0, 1.0)
_SCORES = ([0.5, -0.25], [0.1, 0.0], [], [0.3], [0.2, 0.4], [0.0, 0.5, 0.0, -0.5])  # ragged, may be short
_STATES = (["s0", "s1", "s2"], ["s0", "x"], ["s0", "s1", "s1"], [7], ["s0", None], ["s0", -1, "x", 7])
TURN_METHODS = ("turn-grpo", "turn-index", "anchor-state")


def _ragged(rows):
    col = np.empty(len(rows), dtype=object)  # what verl's agent loop builds for extra_fields
    for i, r in enumerate(rows):
        col[i] = None if r is None else list(r)
    return col


def _multi_turn(dtype=torch.float64):
    """(token_level_rewards [6, 12], response_mask [6, 12] int, uid [6], non_tensor_batch)."""
    mask = torch.tensor([[c == "p" for c in r] for r in _ROWS]).long()  # [6, 12]
    rewards = torch.zeros(mask.shape, dtype=dtype)  # [6, 12]
    for i, r in enumerate(_ROWS):
        rewards[i, len(r.rstrip(".")) - 1] = _OUTCOME[i]
    ntb = {"uid": _UIDS, "turn_scores": _ragged(_SCORES), "state_ids": _ragged(_STATES),
           "tool_rewards": _ragged([[]] * 6)}
    return rewards, mask, _UIDS, ntb


def _runs(row: str):
    """Token positions of each turn (maximal run of policy tokens) of a row string."""
    turns, prev = [], False
    for t, c in enumerate(row):
        if c == "p" and not prev:
            turns.append([])
        if c == "p":
            turns[-1].append(t)
        prev = c == "p"
    return turns


def _plain_turn_credit(kind, runs, turn_rewards, outcome, groups, states, gamma=1.0, omega=1.0, eps=1e-4):
    """The contract (notes/turns_spec.md) in plain Python: per-token advantages [B][T] as floats."""
    B = len(runs)
    K = [len(r) for r in runs]
    r = [[(turn_rewards[i][k] if k < len(turn_rewards[i]) else 0.0) + (outcome[i] if k == K[i] - 1 else 0.0)
          for k in range(K[i])] for i in range(B)]
    G = [[sum(gamma ** (q - k) * r[i][q] for q in range(k, K[i])) for k in range(K[i])] for i in range(B)]
    G0 = [G[i][0] if K[i] else outcome[i] for i in range(B)]
    mates = [[j for j in range(B) if groups[j] == groups[i]] for i in range(B)]

    def std(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    def loo(x, others, pool):
        return 0.0 if not others else (x - sum(others) / len(others)) / (std(pool) + eps)

    def unknown(s):
        return s is None or s == -1

    adv = [[0.0] * len(_ROWS[0]) for _ in range(B)]
    for i in range(B):
        episode = loo(G0[i], [G0[j] for j in mates[i] if j != i], [G0[j] for j in mates[i]])
        for k in range(K[i]):
            if kind == "turn-grpo":
                a = episode
            elif kind == "turn-index":
                a = loo(G[i][k], [G[j][k] for j in mates[i] if j != i and K[j] > k],
                        [G[j][k] for j in mates[i] if K[j] > k])
            else:  # anchor-state
                u = states[i][k] if k < len(states[i]) else None
                same = [] if unknown(u) else [(j, q) for j in mates[i] for q in range(K[j])
                                              if q < len(states[j]) and not unknown(states[j][q]) and states[j][q] == u]
                a = episode + omega * loo(G[i][k], [G[j][q] for j, q in same if j != i], [G[j][q] for j, q in same])
            for t in runs[i][k]:
                adv[i][t] = a
    return adv


def _turn_tensors(rows_rewards, rows_states, K):
    """creditlib's [B, K] tensors of the ragged lists (states coded by equality, -1 unknown)."""
    tr = torch.zeros(len(rows_rewards), K, dtype=torch.float64)
    for i, v in enumerate(rows_rewards):
        tr[i, : len(v)] = torch.tensor(v, dtype=torch.float64)
    codes, st = {}, torch.full((len(rows_states), K), -1, dtype=torch.long)
    for i, v in enumerate(rows_states):
        for k, s in enumerate(v):
            if s is not None and s != -1:
                st[i, k] = codes.setdefault(s, len(codes))
    return tr, st


def _creditlib_turn(method, rewards, mask, ntb, responses=None, turn_ids=None):
    """What creditlib's functions give for the batch (the reference of the estimator)."""
    m = get_credit(method)
    kind = m.advantage_kind.name.replace("_", "-")
    ids = CF.turn_ids_from_mask(mask.bool()) if turn_ids is None else turn_ids  # [B, T]
    K = int(ids.max()) + 1
    tr, st = _turn_tensors(list(ntb["turn_scores"]), list(ntb["state_ids"]), K)
    gid = torch.tensor([0 if u == "a" else 1 for u in _UIDS])
    kw = dict(group_ids=gid, mask=mask.bool(), gamma=m.turn_gamma, scale=m.scale)
    if kind == "anchor-state":
        kw.update(state_ids=st, omega=m.omega)
    if kind == "prefix-turn":
        kw.update(tokens=responses, gae_gamma=m.gae_gamma, gae_lam=m.gae_lam)
    adv = CF.turn_credit(kind, ids, tr, rewards.sum(-1), **kw)  # [B, T]
    return adv if m.clamp_min is None else adv.clamp(min=m.clamp_min)


@pytest.mark.parametrize("name", TURN_METHODS)
def test_turn_estimator_equals_creditlib_turn_credit(clean_env, name):
    rewards, mask, index, ntb = _multi_turn()
    assert get_credit(name).advantage_kind.turns
    adv, ret = cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb, method=name)
    torch.testing.assert_close(adv, _creditlib_turn(name, rewards, mask, ntb), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, adv)
    plain = _plain_turn_credit(name, [_runs(r) for r in _ROWS], _SCORES, _OUTCOME, list(_UIDS), _STATES)
    torch.testing.assert_close(adv, torch.tensor(plain, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert (adv[mask == 0] == 0).all(), "tool responses / observations and padding get no credit"
    if name != "turn-grpo":  # per-turn values differ inside a row: a shifted broadcast would be caught
        assert len({float(adv[0, t]) for t in (0, 4, 9)}) == 3  # row 0's three turns
    clean_env.setenv("CREDITLIB_CREDIT", name)  # the registered "creditlib" estimator reads the method here
    from_env, _ = cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb)
    torch.testing.assert_close(from_env, adv, rtol=0, atol=0)


def test_turn_estimator_discount_omega_and_prefix_turn(clean_env):
    rewards, mask, index, ntb = _multi_turn()
    m = get_credit("anchor-state").replace(name="anchor-state-test", turn_gamma=0.5, omega=0.25)
    adv, _ = cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb, method=m)
    plain = _plain_turn_credit("anchor-state", [_runs(r) for r in _ROWS], _SCORES, _OUTCOME, list(_UIDS), _STATES,
                               gamma=0.5, omega=0.25)
    torch.testing.assert_close(adv, torch.tensor(plain, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    responses = torch.randint(0, 2, mask.shape, generator=torch.Generator().manual_seed(5))  # [6, 12] shared prefixes
    adv, _ = cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb, method="prefix-turn", responses=responses)
    torch.testing.assert_close(adv, _creditlib_turn("prefix-turn", rewards, mask, ntb, responses), rtol=1e-12,
                               atol=1e-12)
    assert (adv[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="needs the response token ids"):
        cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb, method="prefix-turn")


def test_turn_estimator_layouts_and_explicit_turns(clean_env):
    rewards, mask, index, ntb = _multi_turn()
    ref, _ = cv.credit_advantage(rewards, mask, index, non_tensor_batch=ntb, method="anchor-state")
    padded = np.zeros((6, 5))  # a 2-D array (e.g. reward_extra_info with equal lengths), zero-padded
    for i, v in enumerate(_SCORES):
        padded[i, : len(v)] = v
    states = np.array([list(s) + [None] * (4 - len(s)) for s in _STATES], dtype=object)  # [6, 4], None-padded
    for layout in ({"turn_rewards": padded, "state_ids": states},
                   {"turn_rewards": [list(v) for v in _SCORES], "state_ids": list(_STATES)},
                   {"turn_rewards": _ragged([np.array(v) for v in _SCORES]), "state_ids": ntb["state_ids"],
                    "turn_scores": _ragged([[]] * 6)}):  # creditlib's key beside verl's empty turn_scores
        adv, _ = cv.credit_advantage(rewards, mask, index, non_tensor_batch={"uid": _UIDS, **layout},
                                     method="anchor-state")
        torch.testing.assert_close(adv, ref, rtol=0, atol=0)
    # explicit turns: row 3's one run of 5 tokens is two steps; per-token ids over the unpadded response
    ids = CF.turn_ids_from_mask(mask.bool()).clone()  # [6, 12]
    ids[3, 2:5] = 1
    lengths = [len(r.rstrip(".")) for r in _ROWS]
    scores = [list(v) for v in _SCORES]
    scores[3] = [0.3, -0.2]
    given = {**ntb, "turn_scores": _ragged(scores), "turn_ids": _ragged([ids[i, :n].tolist() for i, n in
                                                                         enumerate(lengths)])}
    for kw in ({"non_tensor_batch": given}, {"non_tensor_batch": {k: v for k, v in given.items() if k != "turn_ids"},
                                            "turn_ids": ids}):
        adv, _ = cv.credit_advantage(rewards, mask, index, method="turn-index", **kw)
        torch.testing.assert_close(adv, _creditlib_turn("turn-index", rewards, mask, given, turn_ids=ids),
                                   rtol=1e-12, atol=1e-12)
        assert adv[3, 0] == adv[3, 1] != adv[3, 2] == adv[3, 4]
    bound = cv.make_credit_estimator("turn-index")  # verl calls registered estimators with keywords
    a, _ = bound(token_level_rewards=rewards, response_mask=mask, index=index, config=None, non_tensor_batch=given)
    torch.testing.assert_close(a, _creditlib_turn("turn-index", rewards, mask, given, turn_ids=ids), rtol=0, atol=0)


def test_turn_estimator_errors_name_the_key(clean_env):
    rewards, mask, index, ntb = _multi_turn()

    def call(method="turn-grpo", **kw):
        return cv.credit_advantage(rewards, mask, index, method=method, **kw)

    with pytest.raises(ValueError, match=r"no non_tensor_batch was given.*use_v1=False"):
        call()
    with pytest.raises(ValueError, match=r"'turn-index'.*non_tensor_batch\['turn_rewards'\] or "
                                         r"non_tensor_batch\['turn_scores'\].*agent loop.*keys: \['uid'\]"):
        call("turn-index", non_tensor_batch={"uid": _UIDS})  # what verl's V1 advantage step holds
    with pytest.raises(ValueError, match=r"'anchor-state'.*state ids: non_tensor_batch\['state_ids'\].*verl "
                                         r"produces none.*extra_fields\['state_ids'\]"):
        call("anchor-state", non_tensor_batch={k: v for k, v in ntb.items() if k != "state_ids"})
    bad = dict(ntb, turn_scores=_ragged(list(_SCORES[:3]) + [None] + list(_SCORES[4:])))
    with pytest.raises(ValueError, match=r"non_tensor_batch\['turn_scores'\]\[3\] is None"):
        call(non_tensor_batch=bad)
    bad["turn_scores"] = np.array([0.1] * 6)  # one number per sample is an outcome, not per-turn rewards
    with pytest.raises(ValueError, match=r"\['turn_scores'\]\[0\] must be a sequence"):
        call(non_tensor_batch=bad)
    bad["turn_scores"] = _ragged(_SCORES[:5])
    with pytest.raises(ValueError, match=r"has 5 entries, expected one per sample \(6\)"):
        call(non_tensor_batch=bad)
    bad["turn_scores"] = _ragged(list(_SCORES[:3]) + [[0.3, 0.0, 0.7]] + list(_SCORES[4:]))
    with pytest.raises(ValueError, match=r"\['turn_scores'\]\[3\] gives 3 per-turn rewards \(turn 2: 0.7\) but row 3 "
                                         r"has 1 turns in response_mask"):
        call(non_tensor_batch=bad)
    bad["turn_scores"] = _ragged(list(_SCORES[:3]) + [[0.3, 0.0, 0.0]] + list(_SCORES[4:]))  # trailing zeros: fine
    torch.testing.assert_close(call(non_tensor_batch=bad)[0], call(non_tensor_batch=ntb)[0], rtol=0, atol=0)
    bad["turn_scores"] = _ragged([[float("nan")]] + list(_SCORES[1:]))
    with pytest.raises(ValueError, match=r"\['turn_scores'\]\[0\] holds a non-finite"):
        call(non_tensor_batch=bad)
    for states, msg in (([["s0"], ["s0", "x", "y"]], r"\['state_ids'\]\[1\] gives a state for turn 2 but row 1 has 2"),
                        ([["s0"], [-2]], r"\['state_ids'\]\[1\]\[0\] = -2"),
                        ([["s0"], [0.5]], r"\['state_ids'\]\[1\]\[0\] must be an int, a string or a tuple")):
        with pytest.raises(ValueError, match=msg):
            call("anchor-state", non_tensor_batch=dict(ntb, state_ids=_ragged(states + [[]] * 4)))
    ids = CF.turn_ids_from_mask(mask.bool()).clone()
    ids[1, 4] = 1  # a tool token given a turn
    with pytest.raises(ValueError, match=r"turn_ids must be >= 0 exactly on the response_mask tokens.*row 1, "
                                         r"position 4"):
        call(non_tensor_batch=ntb, turn_ids=ids)
    both = dict(ntb, turn_rewards=_ragged(_SCORES))
    with pytest.raises(ValueError, match="both 'turn_rewards' and verl's 'turn_scores'.*turn_rewards_key="):
        call(non_tensor_batch=both)
    a, _ = call(non_tensor_batch=both, turn_rewards_key="turn_scores")
    torch.testing.assert_close(a, call(non_tensor_batch=ntb)[0], rtol=0, atol=0)


def test_non_turn_methods_do_not_read_non_tensor_batch(clean_env):
    rewards, mask, index, ntb = _multi_turn()
    plain, _ = cv.credit_advantage(rewards, mask, index, method="grpo")
    junk = {"uid": _UIDS, "turn_scores": np.array([None] * 6, dtype=object), "state_ids": np.array([1.5] * 6)}
    adv, _ = cv.credit_advantage(rewards, mask, index, method="grpo", non_tensor_batch=junk)
    torch.testing.assert_close(adv, plain, rtol=0, atol=0)
    assert (adv[3, :5] != 0).all() and adv[0, 4] == adv[0, 0] != 0 == adv[0, 2]  # policy tokens only, as before


# ----------------------------------------------------------------------------- with verl
def _turn_data_proto(rewards, mask, ntb, responses=None):
    from verl import DataProto

    tensors = {"token_level_rewards": rewards, "response_mask": mask}
    if responses is not None:
        tensors["responses"] = responses
    return DataProto.from_dict(tensors=tensors, non_tensors=dict(ntb))


@pytest.mark.parametrize("name", TURN_METHODS + ("prefix-turn",))
def test_verl_compute_advantage_reads_the_turn_inputs(clean_env, name):
    """verl's registry lookup and compute_advantage, the per-turn lists in a DataProto's non_tensor_batch;
    reordered rows (verl's balance_batch) keep each row's lists."""
    core = _verl()
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    assert core.get_adv_estimator_fn("creditlib") is cv.credit_advantage
    rewards, mask, index, ntb = _multi_turn(torch.float32)
    responses = torch.randint(0, 2, mask.shape, generator=torch.Generator().manual_seed(5))  # [6, 12]
    clean_env.setenv("CREDITLIB_CREDIT", name)
    cfg = AlgoConfig(adv_estimator="creditlib")
    data = _turn_data_proto(rewards, mask, ntb, responses)
    out = compute_advantage(data, adv_estimator="creditlib", config=cfg).batch["advantages"]  # [6, 12]
    expected = _creditlib_turn(name, rewards.double(), mask, ntb, responses)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32 and (out[mask == 0] == 0).all()
    perm = [4, 1, 5, 0, 3, 2]
    shuffled = compute_advantage(_turn_data_proto(rewards, mask, ntb, responses).select_idxs(perm),
                                 adv_estimator="creditlib", config=cfg).batch["advantages"]
    torch.testing.assert_close(shuffled, out[perm], rtol=1e-6, atol=1e-7)


def test_verl_turn_ids_in_the_data_batch(clean_env):
    """Explicit turns as a tensor field of the DataProto (row 3's one run split into two steps)."""
    _verl()
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rewards, mask, index, ntb = _multi_turn(torch.float32)
    ids = CF.turn_ids_from_mask(mask.bool()).clone()  # [6, 12]
    ids[3, 2:5] = 1
    data = _turn_data_proto(rewards, mask, ntb)
    data.batch["turn_ids"] = ids
    clean_env.setenv("CREDITLIB_CREDIT", "turn-index")
    out = compute_advantage(data, adv_estimator="creditlib", config=AlgoConfig(adv_estimator="creditlib"))
    expected = _creditlib_turn("turn-index", rewards.double(), mask, ntb, turn_ids=ids)
    torch.testing.assert_close(out.batch["advantages"], expected.float(), rtol=1e-5, atol=1e-6)
    assert out.batch["advantages"][3, 1] != out.batch["advantages"][3, 2]


def test_verl_compute_advantage_without_turn_inputs_says_what_to_write(clean_env):
    _verl()
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rewards, mask, index, ntb = _multi_turn(torch.float32)
    cfg = AlgoConfig(adv_estimator="creditlib")
    clean_env.setenv("CREDITLIB_CREDIT", "turn-index")
    with pytest.raises(ValueError, match=r"'turn_scores'.*keys: \['uid'\].*use_v1=False"):
        compute_advantage(_turn_data_proto(rewards, mask, {"uid": index}), adv_estimator="creditlib", config=cfg)
    clean_env.setenv("CREDITLIB_CREDIT", "anchor-state")
    with pytest.raises(ValueError, match=r"state ids: non_tensor_batch\['state_ids'\]"):
        compute_advantage(_turn_data_proto(rewards, mask, {k: v for k, v in ntb.items() if k != "state_ids"}),
                          adv_estimator="creditlib", config=cfg)
    clean_env.setenv("CREDITLIB_CREDIT", "grpo")  # a sequence-level method needs none of them
    compute_advantage(_turn_data_proto(rewards, mask, {"uid": index}), adv_estimator="creditlib", config=cfg)


def test_verl_agent_loop_output_layout(clean_env):
    """verl's own agent-loop postprocessing (AgentLoopWorker._postprocess) builds the batch: turn_scores
    (verl's key; [] from its single-turn loop) and a custom loop's extra_fields['state_ids'] arrive as
    object arrays, the outcome as rm_scores on the last response token."""
    _verl()
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopWorker, _InternalAgentLoopOutput
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    P, T = 3, len(_ROWS[0])
    outs = []
    for i, row in enumerate(_ROWS):
        n = len(row.rstrip("."))
        resp_mask = torch.tensor([[c == "p" for c in row]]).long()  # [1, T]
        att = torch.cat([torch.ones(1, P), (torch.arange(T) < n)[None].float()], dim=1).long()  # [1, P + T]
        extra = {"turn_scores": list(_SCORES[i]), "tool_rewards": [], "state_ids": list(_STATES[i])}
        outs.append(_InternalAgentLoopOutput(
            prompt_ids=torch.ones(1, P, dtype=torch.long), response_ids=torch.full((1, T), 5), input_ids=torch.ones(
                1, P + T, dtype=torch.long), position_ids=torch.arange(P + T)[None], response_mask=resp_mask,
            attention_mask=att, reward_score=_OUTCOME[i], num_turns=2 * len(_runs(row)), metrics=AgentLoopMetrics(),
            extra_fields=extra))
    worker = object.__new__(AgentLoopWorker)  # _postprocess reads only this attribute of the worker
    worker.reward_loop_worker_handles = None
    data = worker._postprocess(outs, input_non_tensor_batch={"uid": _UIDS})
    assert data.non_tensor_batch["turn_scores"].dtype == object and data.non_tensor_batch["state_ids"].dtype == object
    data.batch["token_level_rewards"] = data.batch["rm_scores"]
    clean_env.setenv("CREDITLIB_CREDIT", "anchor-state")
    out = compute_advantage(data, adv_estimator="creditlib", config=AlgoConfig(adv_estimator="creditlib"))
    rewards, mask, _, ntb = _multi_turn()
    torch.testing.assert_close(data.batch["token_level_rewards"].double(), rewards)
    expected = _creditlib_turn("anchor-state", rewards, mask, ntb)
    torch.testing.assert_close(out.batch["advantages"], expected.float(), rtol=1e-5, atol=1e-6)


def test_verl_v1_refuses_turn_credit_on_multi_output_sessions(clean_env):
    _verl()
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories as multi

    keys, index, mask, rewards = _sessions()
    clean_env.setenv("CREDITLIB_CREDIT", "turn-grpo")
    d = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                            non_tensors={"uid": index, "turn_scores": _ragged([[]] * len(keys))})
    with pytest.raises(ValueError, match="cannot be broadcast"):
        multi(d, keys, adv_estimator="creditlib", config=AlgoConfig(adv_estimator="creditlib"))
