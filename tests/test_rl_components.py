"""Unit tests of creditlib.rl: config/CLI, task, rewards, checkpoints, rollout masks, the update's NaN guard."""

import math
import os
import threading
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from creditlib.rl import checkpoint as ckpt  # noqa: E402
from creditlib.rl.config import RecipeConfig, build_parser, load_config, parse_args  # noqa: E402
from creditlib.rl.distributed import DistInfo  # noqa: E402
from creditlib.rl.model import NonFiniteError, completion_logprobs, tiny_qwen2  # noqa: E402
from creditlib.rl.rewards import SafeReward  # noqa: E402
from creditlib.rl.rollout import HFRollout, RolloutBatch, completion_mask_from_eos, left_pad  # noqa: E402
from creditlib.rl.task import ChainTask, build_char_tokenizer, chain_reward  # noqa: E402
from creditlib.rl.train import optimizer_step  # noqa: E402
from creditlib.losses.functional import grpo_lambda_loss  # noqa: E402


# ----------------------------------------------------------------------------- config
def test_cli_flags_yaml_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nalgo:\n  lam: 0.5\nclamp-min: null\nseed: 3\n")
    cfg = parse_args(["--config", str(y), "--seed", "9", "--output-dir", "o", "--resume"], defaults={"lr": 0.5})
    assert (cfg.max_steps, cfg.lam, cfg.clamp_min, cfg.seed, cfg.output_dir, cfg.resume, cfg.lr) == \
        (7, 0.5, None, 9, "o", True, 0.5)
    assert parse_args(["--clamp-min", "none"]).clamp_min is None
    assert parse_args(["--clamp-min", "-0.2"]).clamp_min == -0.2
    assert parse_args(["--no-progress"]).progress is False


def test_cli_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lam", "2"])
    assert "lam must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--rollout", "sglang"])
    y = tmp_path / "bad.yaml"
    y.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown option 'max_step'.*max_steps"):
        load_config(str(y))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        load_config(overrides={"group_size": 1})


def test_help_documents_every_field():
    text = build_parser().format_help()
    import dataclasses

    for f in dataclasses.fields(RecipeConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f.metadata["help"].split()[0] in text
    for flag in ("--max-steps", "--output-dir", "--seed", "--resume", "--config"):
        assert flag in text


# ----------------------------------------------------------------------------- task
def test_task_heldout_disjoint_and_answers_correct():
    task = ChainTask(num_ops=6, data_seed=1, heldout_sizes={"test": 100, "val": 50})
    test = {p.prompt for p in task.heldout("test")}
    val = {p.prompt for p in task.heldout("val")}
    assert len(test) == 100 and len(val) == 50 and not test & val
    train, nxt = task.train(0, 2000)
    assert nxt >= 2000 and not {p.prompt for p in train} & (test | val)
    for p in train[:50]:
        r = int(p.prompt[0])
        steps = []
        for op in p.prompt[1:-1]:
            r = (r + (1 if op == "+" else -1)) % 10
            steps.append(str(r))
        assert p.solution == "".join(steps) + f"={r}" and p.answer == str(r)
    assert task.train(0, 5)[0] == train[:5]  # the data position alone fixes the stream
    with pytest.raises(ValueError, match="num_ops"):
        ChainTask(num_ops=0)
    with pytest.raises(ValueError, match="held-out splits"):
        ChainTask(num_ops=3, heldout_sizes={"test": 60})


def test_tokenizer_roundtrip_and_reward():
    tok = build_char_tokenizer()
    ids = tok("3+-+?")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "3+-+?"
    assert chain_reward(["454=4", "454=5", "4545", "=4 "], ["4", "4", "4", "4"]) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same length"):
        chain_reward(["1"], [])


# ----------------------------------------------------------------------------- rewards
def _flaky(completions, answers):
    out = []
    for c, a in zip(completions, answers):
        if c == "boom":
            raise RuntimeError("parser crashed")
        if c == "hang":
            threading.Event().wait()  # blocks forever
        if c == "spin":
            while True:  # pure-Python busy loop
                pass
        if c == "nan":
            out.append(float("nan"))
            continue
        out.append(1.0 if c == a else 0.0)
    return out


@pytest.mark.parametrize("bad", ["boom", "hang", "spin", "nan"])
def test_safe_reward_marks_failing_sample_wrong_and_continues(bad):
    reward = SafeReward(_flaky, timeout=0.3)
    comps = ["1", bad, "3", "4"]
    t0 = time.time()
    with pytest.warns(RuntimeWarning, match="counted as wrong"):
        r, stats = reward(comps, ["1", "2", "3", "0"])
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert stats["reward_errors"] + stats["reward_timeouts"] == 1
    assert time.time() - t0 < 30  # generous: it did not hang
    r2, stats2 = reward(["1", "2"], ["1", "2"])  # the next batch is unaffected
    assert r2.tolist() == [1.0, 1.0] and stats2 == {"reward_errors": 0, "reward_timeouts": 0}


def test_safe_reward_in_worker_thread_times_out():
    reward = SafeReward(_flaky, timeout=0.3)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", reward(["hang", "5"], ["1", "5"])))
    th.start()
    th.join(30)
    assert not th.is_alive()
    assert box["r"][0].tolist() == [0.0, 1.0] and box["r"][1]["reward_timeouts"] == 1


# ----------------------------------------------------------------------------- rollout helpers
def test_completion_mask_and_left_pad():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])  # eos = 2
    m = completion_mask_from_eos(ids, [2])
    assert m.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _tiny(seed=0):
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    return tiny_qwen2(len(tok), 32, 1, 2, 64), tok


def test_logprobs_match_left_padding_and_rollout_shapes():
    model, tok = _tiny()
    model.eval()
    ro = HFRollout(model, tok, max_new_tokens=6)
    ids, mask = left_pad([tok("1+-+?")["input_ids"], tok("2-?")["input_ids"]], tok.pad_token_id)  # [2, P]
    torch.manual_seed(1)
    b = ro.rollout(ids, mask, 3)
    assert b.completion_ids.shape[0] == 6 and len(b.texts) == 6 and b.group_size == 3
    lp = completion_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)  # [6, T]
    # the same completion without left padding gives the same log-probs (positions follow the mask)
    k = 3  # first completion of the short (padded) prompt
    P = int(b.prompt_mask[k].sum())
    T = int(b.completion_mask[k].sum())
    lp1 = completion_logprobs(model, b.prompt_ids[k:k + 1, -P:], b.prompt_mask[k:k + 1, -P:],
                              b.completion_ids[k:k + 1, :T], b.completion_mask[k:k + 1, :T])
    torch.testing.assert_close(lp[k, :T], lp1[0], atol=1e-5, rtol=1e-5)
    assert (lp[~b.completion_mask] == 0).all() and (lp[b.completion_mask] < 0).all()


# ----------------------------------------------------------------------------- update + NaN guard
def _batch(tok, G=4):
    ids, mask = left_pad([tok("1++?")["input_ids"], tok("4--?")["input_ids"]], tok.pad_token_id)
    comp = torch.tensor([[5, 6, 17, 6, 2]] * (2 * G))  # "23=3"+eos-ish digits, [B, T]
    return RolloutBatch(ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), comp,
                        torch.ones_like(comp, dtype=torch.bool), ["x"] * (2 * G), G)


def _update(model, opt, batch, adv, old_logp=None):
    """One clipped-surrogate update through the recipe's optimizer step; returns ``(loss, grad_norm, log-probs)``."""
    logp = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask)  # [B, T] carries the gradient
    old = logp.detach() if old_logp is None else old_logp  # [B, T]
    loss, _ = grpo_lambda_loss(logp, old, adv, batch.completion_mask, None, clip_eps=0.2)
    gnorm = optimizer_step(model, opt, loss, DistInfo(), 1.0)
    return float(loss.detach()), float(gnorm), logp.detach()


def test_optimizer_step_changes_weights_and_stops_on_nan():
    model, tok = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = _batch(tok)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])  # [B]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, gnorm, logp = _update(model, opt, b, adv)
    assert math.isfinite(loss) and gnorm > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # NaN in a weight: NonFiniteError before any optimizer step; weights and optimizer state untouched
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {i: {n: t.clone() for n, t in st.items()} for i, st in opt.state_dict()["state"].items()}
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        _update(model, opt, b, adv, old_logp=logp)
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(7.0), snap[k].nan_to_num(7.0)), k
    for i, st in opt.state_dict()["state"].items():
        assert all(torch.equal(t, opt_state[i][n]) for n, t in st.items()), i
    with pytest.raises(ckpt.NonFiniteWeightsError):
        ckpt.save_checkpoint("/nonexistent-never-written", 1, model, opt, {}, DistInfo())


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_tied_weights_optimizer_rng(tmp_path):
    model, tok = _tiny()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _update(model, opt, _batch(tok), torch.linspace(-1, 1, 8))
    torch.manual_seed(123)
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"position": 77}, DistInfo(), keep=2)
    expect_rand = torch.rand(3)  # the draw right after checkpoint 5
    model2, _ = _tiny(seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    torch.manual_seed(0)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model2, opt2, DistInfo())
    assert state["step"] == 5 and state["position"] == 77
    assert torch.equal(torch.rand(3), expect_rand)  # RNG restored
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    osd, osd2 = opt.state_dict(), opt2.state_dict()
    assert osd["state"].keys() == osd2["state"].keys() and osd["param_groups"] == osd2["param_groups"]
    for i, st in osd["state"].items():
        assert all(torch.equal(st[n], osd2["state"][i][n]) for n in st), i
    # restored model + optimizer continue identically
    m1 = _update(model, opt, _batch(tok), torch.linspace(-1, 1, 8))
    m2 = _update(model2, opt2, _batch(tok), torch.linspace(-1, 1, 8))
    assert m1[:2] == m2[:2] and torch.equal(m1[2], m2[2])
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    ckpt.save_checkpoint(tmp_path, 6, model, opt, {"position": 78}, DistInfo(), keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000006"]
