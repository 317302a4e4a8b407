"""Nothing lost, nothing hanging, clear errors (issue 10 section 4, the recipe-side items).

Each test here failed on the 0.1 main: damaged checkpoints under ``--resume``, checkpoint-load
errors that named nothing, the answer-length cap bypassed through the last-number fallback, a
malformed JSONL line without its file and line number, non-finite rewards.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from creditlib.rl import checkpoint as ckpt  # noqa: E402
from creditlib.rl.distributed import DistInfo  # noqa: E402
from creditlib.rl.model import tiny_qwen2  # noqa: E402
from creditlib.rl.task import build_char_tokenizer  # noqa: E402


# ----------------------------------------------------------------------------- checkpoints
def _tiny(seed=0):
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    model = tiny_qwen2(len(tok), 32, 1, 2, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # one optimizer step so the optimizer state is not empty
    model(input_ids=torch.tensor([[1, 5, 6]]), labels=torch.tensor([[1, 5, 6]])).loss.backward()
    opt.step()
    return model, opt


@pytest.fixture()
def run3(tmp_path):
    """A run folder holding intact checkpoints of steps 1, 2, 3 (``latest`` -> step 3)."""
    model, opt = _tiny()
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, model, opt, {"position": 10 * s}, DistInfo(), keep=3)
    return tmp_path


def _ck(run, step):
    return run / "checkpoints" / f"step_{step:06d}"


def _truncate(f: Path, keep: int):
    data = f.read_bytes()
    f.write_bytes(data[:keep])


def test_resolve_resume_intact_and_empty(tmp_path, run3):
    assert ckpt.resolve_resume(tmp_path / "nothing-here") is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert ckpt.resolve_resume(tmp_path / "empty") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact run resumes silently
        assert ckpt.resolve_resume(run3) == _ck(run3, 3)
    assert [p.name for p in ckpt.intact_checkpoints(run3)] == ["step_000003", "step_000002", "step_000001"]


@pytest.mark.parametrize("damage", ["truncated-model", "missing-optimizer", "truncated-state", "dangling-latest",
                                    "deleted-dir", "truncated-rng"])
def test_resolve_resume_falls_back_to_newest_intact_and_says_so(run3, damage):
    c3 = _ck(run3, 3)
    if damage == "truncated-model":
        _truncate(c3 / "model.safetensors", 1000)
    elif damage == "missing-optimizer":
        (c3 / "optimizer.safetensors").unlink()
    elif damage == "truncated-state":
        _truncate(c3 / "trainer_state.json", 5)
    elif damage == "dangling-latest":
        (run3 / "checkpoints" / "latest").write_text("step_000009")
    elif damage == "deleted-dir":
        import shutil

        shutil.rmtree(c3)
    elif damage == "truncated-rng":
        _truncate(c3 / "rng_rank0.safetensors", 20)
    said = []
    got = ckpt.resolve_resume(run3, warn=said.append)
    assert got == _ck(run3, 2) if damage != "dangling-latest" else got == c3  # newest intact
    assert len(said) == 1 and "Resuming from the newest intact checkpoint" in said[0] and str(got) in said[0]
    if damage in ("truncated-model", "missing-optimizer", "truncated-state", "truncated-rng"):
        assert "step_000003" in said[0] and "damaged" in said[0]
    # the default reporter is a RuntimeWarning
    with pytest.warns(RuntimeWarning, match="newest intact"):
        ckpt.resolve_resume(run3)


def test_resolve_resume_all_damaged_raises_naming_them(run3):
    for s in (1, 2, 3):
        _truncate(_ck(run3, s) / "model.safetensors", 100)
    with pytest.raises(ckpt.CheckpointError, match=r"step_000003.*model\.safetensors.*truncated") as ei:
        ckpt.resolve_resume(run3)
    assert "step_000001" in str(ei.value) and "No intact checkpoint" in str(ei.value)
    # only a pointer, nothing else: still an error, never "start from scratch"
    for s in (1, 2, 3):
        import shutil

        shutil.rmtree(_ck(run3, s))
    with pytest.raises(ckpt.CheckpointError, match="latest"):
        ckpt.resolve_resume(run3)


@pytest.mark.parametrize("name", ["../../outside", "/etc", "step_000002/../../x", "step_1/../step_000002"])
def test_latest_cannot_point_outside(run3, tmp_path_factory, name):
    outside = tmp_path_factory.mktemp("elsewhere")
    model, opt = _tiny()
    ckpt.save_checkpoint(outside, 7, model, opt, {"position": 0}, DistInfo())
    (run3 / "checkpoints" / "latest").write_text(name)
    assert ckpt.latest_checkpoint(run3) is None
    said = []
    got = ckpt.resolve_resume(run3, warn=said.append)
    assert got == _ck(run3, 3) and "not a step_N directory" in said[0]
    # a symlinked step dir (into another run) is refused outright: as latest's target or as a fallback,
    # and pruning never follows it
    link = run3 / "checkpoints" / "step_000099"
    link.symlink_to(_ck(outside, 7), target_is_directory=True)
    (run3 / "checkpoints" / "latest").write_text("step_000099")
    assert ckpt.latest_checkpoint(run3) is None
    for latest in ("step_000099", "step_000042"):  # pointing at the link, or dangling (the fallback took the link)
        (run3 / "checkpoints" / "latest").write_text(latest)
        with pytest.raises(ckpt.CheckpointError, match=r"symbolic link.*step_000099|step_000099.*symbolic link"):
            ckpt.resolve_resume(run3, warn=lambda m: None)
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        ckpt.save_checkpoint(run3, 4, model, opt, {"position": 40}, DistInfo())
    assert (_ck(outside, 7) / "model.safetensors").is_file()


def test_load_errors_name_the_file_and_the_newest_intact(run3):
    model, opt = _tiny(1)
    _truncate(_ck(run3, 3) / "optimizer.safetensors", 300)
    with pytest.raises(ckpt.CheckpointError) as ei:
        ckpt.load_checkpoint(_ck(run3, 3), model, opt, DistInfo())
    msg = str(ei.value)
    assert "optimizer.safetensors" in msg and "truncated" in msg and str(_ck(run3, 2)) in msg
    # a checkpoint of another model shape: names model.safetensors
    other = tiny_qwen2(len(build_char_tokenizer()), 48, 1, 2, 64)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors does not fit") as ei:
        ckpt.load_checkpoint(_ck(run3, 2), other, torch.optim.AdamW(other.parameters()), DistInfo())
    assert str(_ck(run3, 1)) in str(ei.value) or str(_ck(run3, 2)) in str(ei.value)
    # an intact one still loads
    assert ckpt.load_checkpoint(_ck(run3, 2), model, opt, DistInfo())["position"] == 20


def test_pruning_keeps_this_runs_checkpoints(tmp_path):
    """A new timeline in an old folder (resume past a damaged checkpoint, or a fresh start) must not
    have its own checkpoints pruned in favour of the old, higher-numbered ones."""
    model, opt = _tiny()
    for s in (100, 200):
        ckpt.save_checkpoint(tmp_path, s, model, opt, {"position": s}, DistInfo(), keep=2)
    (tmp_path / "checkpoints" / "step_000300.tmp").mkdir()  # a killed save
    for s in (0, 25, 50):
        ckpt.save_checkpoint(tmp_path, s, model, opt, {"position": s}, DistInfo(), keep=2)
        assert ckpt.latest_checkpoint(tmp_path).name == f"step_{s:06d}"
        assert ckpt.resolve_resume(tmp_path) == _ck(tmp_path, s)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000025", "step_000050"]


# ----------------------------------------------------------------------------- the recipe's dataset loader
def _cfg_no_model_check(dataset, **kw):
    from creditlib.rl.config import load_config

    return load_config(overrides=dict(dataset=dataset, **kw))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, suffix):
    from creditlib.rl.data import build_source

    f = tmp_path / f"train{suffix}"
    good = json.dumps({"question": "1+1?", "answer": "2"})
    f.write_text("\n".join([good, good, '{"question": "2+2?", "answer": ', good]) + "\n")
    cfg = _cfg_no_model_check(str(f))
    with pytest.raises(ValueError) as ei:
        build_source(cfg, build_char_tokenizer())
    msg = str(ei.value)
    assert str(f) in msg and "line 3" in msg
    # a row that is valid JSON but not an object, and a row without an answer: named too
    f.write_text(good + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2 holds a JSON list"):
        build_source(cfg, build_char_tokenizer())
    f.write_text(good + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.json.*row 2.*answer"):
        build_source(cfg, build_char_tokenizer())


def test_offline_hub_error_names_the_recipe_flag(monkeypatch):
    """GSM8K / MATH from the Hub while offline: the error says to pass --dataset FILE."""
    import datasets

    from creditlib.rl.data import build_source

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("gsm8k", "math"):
        with pytest.raises(RuntimeError, match=r"--dataset FILE") as ei:
            build_source(_cfg_no_model_check(name), build_char_tokenizer())
        assert "Hugging Face Hub" in str(ei.value) and "ConnectionError" in str(ei.value)


# ----------------------------------------------------------------------------- rewards
def _nonfinite(completions, answers):
    table = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "none": None, "str": "x"}
    return [table.get(c, 1.0 if c == a else 0.0) for c, a in zip(completions, answers)]


def test_nonfinite_rewards_are_wrong_and_counted_and_the_advantage_is_finite():
    from creditlib import functional as F
    from creditlib.rl.rewards import SafeReward

    reward = SafeReward(_nonfinite, timeout=5.0)
    comps = ["1", "nan", "inf", "4", "-inf", "none", "str", "8"]
    with pytest.warns(RuntimeWarning, match="counted as wrong"):
        r, stats = reward(comps, ["1", "2", "3", "4", "5", "6", "7", "0"])
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert stats == {"reward_errors": 5, "reward_timeouts": 0} and reward.total_errors == 5
    adv = F.group_advantage(r, 4)  # [8]: finite (a raw NaN reward would raise here now)
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError):
        F.group_advantage(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 4)


def test_a_self_timed_reward_gets_the_timeout_and_no_second_alarm():
    """The math reward bounds its own time (verifier worker processes): SafeReward hands it the
    limit instead of wrapping it in a SIGALRM that would interrupt the pool mid-batch."""
    import signal

    from creditlib.eval.rewards import accuracy_reward
    from creditlib.rl.rewards import SafeReward

    seen = {}

    def timed(completions, answers, *, timeout):
        seen["timeout"] = timeout
        seen["alarm"] = signal.getitimer(signal.ITIMER_REAL)[0]
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answers)]

    timed.bounded_time = True
    r, _ = SafeReward(timed, timeout=2.5)(["1", "2"], ["1", "3"])
    assert r.tolist() == [1.0, 0.0] and seen == {"timeout": 2.5, "alarm": 0.0}
    assert getattr(accuracy_reward, "bounded_time", False)
    r, stats = SafeReward(accuracy_reward, timeout=3.0)(["so \\boxed{4}", "\\boxed{5}", 7], ["4", "4", "4"])
    assert r.tolist() == [1.0, 0.0, 0.0] and stats == {"reward_errors": 0, "reward_timeouts": 0}
