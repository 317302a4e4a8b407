"""The learning study (issues 6 and 12): statistics on curves with known answers; the study's tasks
(early, late, long, walk: generators, disjoint splits, rewards, one registry call each, the held-out
split switch); the per-method lr selection and the analysis / report on run folders with known curves;
and a tiny end-to-end sweep of ``benchmarks/learning_study.py`` (selection on the validation split,
reported runs on the test split, resume, extension) so the runner cannot rot. The study's code lives
in ``benchmarks/study/`` (not in the library)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from creditlib.rl.task import ChainTask

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from study import stats as S  # noqa: E402
from study.tasks import EarlyDecisionTask, early_decision_reward, extract_decision, register_tasks  # noqa: E402


def _load_runner():
    spec = importlib.util.spec_from_file_location("learning_study", ROOT / "benchmarks" / "learning_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("learning_study", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _curve(acc, reward, eval_every=10, label="", seed=0, status="done"):
    acc = np.asarray(acc, float)
    reward = np.asarray(reward, float)
    return S.RunCurve(eval_steps=np.arange(acc.size) * eval_every, accuracy=acc,
                      rl_steps=np.arange(1, reward.size + 1), reward=reward,
                      step_seconds=np.full(reward.size, 0.5), label=label, seed=seed, status=status)


# --------------------------------------------------------------------------- statistics

def test_moving_average_known_values():
    np.testing.assert_allclose(S.moving_average([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(S.moving_average([4, 0, 2], 5), [4, 2, 2])
    np.testing.assert_allclose(S.moving_average([3.0], 1), [3.0])
    with pytest.raises(ValueError, match="window"):
        S.moving_average([1, 2], 0)


def test_steps_to_threshold_and_seconds():
    steps = np.arange(0, 101)
    vals = steps / 100.0
    assert S.steps_to_threshold(steps, vals, 0.5) == 50
    assert S.steps_to_threshold(steps, vals, 0.0) == 0
    assert S.steps_to_threshold(steps, vals, 1.01) is None
    # non-monotone: the FIRST crossing counts
    assert S.steps_to_threshold([0, 10, 20, 30], [0.1, 0.8, 0.2, 0.9], 0.7) == 10
    c = _curve([0.1, 0.2], [0.0] * 20)
    assert S.seconds_to_step(c, 10) == pytest.approx(5.0)
    assert S.seconds_to_step(c, 0) == 0.0
    with pytest.raises(ValueError, match="same length"):
        S.steps_to_threshold([0, 1], [0.1], 0.5)


def test_area_under_curve_known_values():
    assert S.area_under_curve([0, 50, 100], [0.3, 0.3, 0.3]) == pytest.approx(0.3)
    assert S.area_under_curve(np.arange(11), np.arange(11) / 10) == pytest.approx(0.5)
    # uneven spacing: 0 over [0, 10], then rises to 1 over [10, 20] -> area 5 / span 20
    assert S.area_under_curve([0, 10, 20], [0, 0, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        S.area_under_curve([], [])


def test_collapse_detection():
    assert S.is_collapsed([0.5, 0.4, 0.2, 0.1, 0.1, 0.05])              # falls and stays
    assert not S.is_collapsed([0.5, 0.2, 0.1, 0.4, 0.6, 0.7])           # dips, recovers
    assert not S.is_collapsed([0.5, 0.55, 0.6, 0.6, 0.7])               # improves
    assert not S.is_collapsed([0.5, 0.47, 0.46, 0.47, 0.46], margin=0.05)  # within the margin
    assert not S.is_collapsed([0.5, 0.1])                               # too short to say
    assert not S.is_collapsed([0.5, 0.1, 0.1, 0.1, 0.1, 0.6])           # last value back above
    with pytest.raises(ValueError, match="tail"):
        S.is_collapsed([0.5, 0.1, 0.1], tail=0.0)


def test_bootstrap_ci_degenerate_cases():
    assert S.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    p, lo, hi = S.bootstrap_ci([3.0])
    assert p == 3.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in S.bootstrap_ci([]))
    p, lo, hi = S.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert p == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    p2, lo2, hi2 = S.bootstrap_ci([1.0, 2.0, 3.0, 4.0], stat=np.median)
    assert p2 == 2.5 and lo2 <= p2 <= hi2


def test_bootstrap_ci_coverage_of_a_known_mean():
    """About 95% of intervals from N(1, 1) samples of 30 contain the true mean 1 (percentile bootstrap
    under-covers a little at n = 30; 300 replicates give a binomial s.d. of ~1.3%)."""
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(300):
        _, lo, hi = S.bootstrap_ci(rng.normal(1.0, 1.0, size=30), n_boot=2000, seed=i)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / 300 <= 0.99


def test_ratio_ci_known_ratio():
    a = [10.0, 12.0, 14.0, 11.0, 13.0]
    b = [2 * x for x in a]
    p, lo, hi = S.ratio_ci(a, b)
    assert p == pytest.approx(0.5)
    assert lo < 0.5 < hi and hi - lo < 0.5
    assert S.ratio_ci([3.0, 3.0], [6.0, 6.0]) == (0.5, 0.5, 0.5)
    p, lo, hi = S.ratio_ci([3.0], [6.0, 6.0])
    assert p == 0.5 and math.isnan(lo)
    assert all(math.isnan(v) for v in S.ratio_ci([1.0], [0.0, 0.0]))


def test_summarize_and_compare_known_answer():
    # variant "fast" crosses accuracy 0.6 at step 20 in every seed, "slow" at step 40; one slow seed never does
    fast = [_curve([0.5, 0.55, 0.65, 0.7, 0.7], [0.2] * 5 + [0.6] * 35, seed=s) for s in range(3)]
    slow = [_curve([0.5, 0.52, 0.55, 0.58, 0.62], [0.2] * 15 + [0.6] * 25, seed=s) for s in range(2)]
    slow.append(_curve([0.5, 0.4, 0.3, 0.2, 0.2], [0.1] * 40, seed=2))  # collapsed, never reaches
    keys = dict(acc_thresholds=[0.6], reward_thresholds=[0.4], window=5, n_boot=2000)
    sf, ss = S.summarize(fast, **keys), S.summarize(slow, **keys)
    assert sf[("accuracy", 0.6)]["steps_list"] == [20.0, 20.0, 20.0]
    assert sf[("accuracy", 0.6)]["reached"] == 3
    assert ss[("accuracy", 0.6)]["steps_list"] == [40.0, 40.0, 40.0]  # the censored seed counts at its last step
    assert ss[("accuracy", 0.6)]["reached"] == 2
    # reward MA (window 5, full windows only): rewards 0.2 (steps 1-5) then 0.6;
    # MA over steps 4-8 = (2 x 0.2 + 3 x 0.6) / 5 = 0.44, the first >= 0.4
    assert sf[("reward", 0.4)]["steps_list"] == [8.0, 8.0, 8.0]
    assert sf[("accuracy", 0.6)]["seconds"][0] == pytest.approx(10.0)  # 20 steps x 0.5 s
    assert sf["collapse"] == 0 and ss["collapse"] == 1
    assert sf["final_accuracy"][0] == pytest.approx(0.7)
    assert ss["final_accuracy"][0] == pytest.approx((0.62 + 0.62 + 0.2) / 3)
    r = S.compare({"fast": sf, "slow": ss}, "slow", ("accuracy", 0.6), n_boot=2000)
    assert r["fast"][0] == pytest.approx(0.5)
    assert r["slow"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="baseline"):
        S.compare({"fast": sf}, "grpo", ("accuracy", 0.6))
    # a reward curve shorter than the window never counts as reaching it
    short = S.summarize([_curve([0.5, 0.9], [1.0, 1.0])], reward_thresholds=[0.5], window=5, n_boot=100)
    assert short[("reward", 0.5)]["reached"] == 0


def test_markdown_table_and_fmt():
    t = S.markdown_table(["a", "b"], [[1, 2], ["x", "y"]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| x | y |"]
    with pytest.raises(ValueError):
        S.markdown_table(["a"], [[1, 2]])
    assert S.fmt_ci((0.5, 0.4, 0.6)) == "0.50 [0.40, 0.60]"
    assert S.fmt_ci((12.0, 12.0, 12.0), 1, lower_bound=True) == ">=12.0 [12.0, 12.0]"
    assert S.fmt_ci((math.nan, math.nan, math.nan)) == "n/a"
    assert S.fmt_ci((0.5, math.nan, math.nan)) == "0.50"


def test_load_run_and_truncate(tmp_path):
    recs = [{"phase": "sft", "step": 0, "heldout_accuracy": 0.0}, {"phase": "eval", "step": 0, "accuracy": 0.5}]
    for s in range(1, 7):
        recs.append({"phase": "rl", "step": s, "reward": s / 10, "step_seconds": 0.25, "grad_norm": float(s)})
        if s % 3 == 0:
            recs.append({"phase": "eval", "step": s, "accuracy": 0.5 + s / 100})
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"phase": "rl", "st'  # a killed run's last line
    (tmp_path / "metrics.jsonl").write_text(text)
    c = S.load_run(tmp_path, max_steps=6)
    assert c.status == "done" and c.last_step == 6
    np.testing.assert_allclose(c.eval_steps, [0, 3, 6])
    np.testing.assert_allclose(c.accuracy, [0.5, 0.53, 0.56])
    np.testing.assert_allclose(c.reward, np.arange(1, 7) / 10)
    assert S.load_run(tmp_path, max_steps=10).status == "partial"
    t = S.truncate(c, 3)
    assert t.last_step == 3 and list(t.eval_steps) == [0, 3] and t.max_steps == 3
    with pytest.raises(ValueError, match="metrics.jsonl"):
        S.load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="same shape"):
        S.RunCurve([0, 1], [0.5], [1], [0.1], [0.1])


def test_plots_write_pngs(tmp_path):
    groups = {"a": [_curve([0.5, 0.6, 0.7], [0.2] * 20, seed=s) for s in range(2)],
              "b": [_curve([0.5, 0.55, 0.6], [0.1] * 20)]}
    sums = {k: S.summarize(v, [0.6], [0.15], window=5, n_boot=200) for k, v in groups.items()}
    for png in (S.plot_curves(groups, tmp_path / "acc.png", "accuracy", thresholds=[0.6]),
                S.plot_curves(groups, tmp_path / "rew.png", "reward", window=5),
                S.plot_threshold_bars(sums, [("accuracy", 0.6), ("reward", 0.15)], tmp_path / "bars.png")):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="metric"):
        S.plot_curves(groups, tmp_path / "x.png", "loss")


# --------------------------------------------------------------------------- the early-decision task

def _walk_end(prompt: str) -> str:
    r = int(prompt[0])
    for op in prompt[1:-1]:
        r = (r + (1 if op == "+" else -1)) % 10
    return str(r)


def test_early_task_problems_and_reward():
    task = EarlyDecisionTask(num_ops=8, filler_length=24, data_seed=7, heldout_sizes={"test": 64, "val": 32})
    assert task.completion_length == 26
    train, nxt = task.train(0, 50)
    assert nxt >= 50
    held = {p.prompt for p in task.heldout("test")} | {p.prompt for p in task.heldout("val")}
    assert not held & {p.prompt for p in train}
    for p in train + task.heldout("test", 10):
        assert p.prompt.endswith("?") and len(p.prompt) == 10
        assert p.answer == _walk_end(p.prompt)
        assert p.solution[0] == p.answer and len(p.solution) == 25
        assert set(p.solution[1:]) <= set("+-")
    # the same (seed, split, index) -> the same problem; the decisions are not all alike
    assert task.problem("train", 3) == EarlyDecisionTask(8, 24, 7, {"test": 64, "val": 32}).problem("train", 3)
    assert len({p.answer for p in train}) >= 5
    # only the first character counts
    ans = [p.answer for p in train[:3]]
    wrong = str((int(ans[0]) + 1) % 10)
    assert early_decision_reward([ans[0] + "garbage", wrong + "+" * 24, " " + ans[2]], ans) == [1.0, 0.0, 1.0]
    assert extract_decision("") is None
    with pytest.raises(ValueError, match="same length"):
        early_decision_reward(["1"], [])
    with pytest.raises(ValueError, match="num_ops"):
        EarlyDecisionTask(num_ops=0)
    with pytest.raises(ValueError, match="filler_length"):
        EarlyDecisionTask(filler_length=0)
    with pytest.raises(ValueError, match="held-out"):
        EarlyDecisionTask(num_ops=3, heldout_sizes={"test": 512})
    with pytest.raises(ValueError, match="split"):
        task.heldout("dev")


def test_early_task_heldout_splits_are_disjoint():
    """Like ChainTask's: val excludes test (they used to be drawn independently and share ~10%)."""
    task = EarlyDecisionTask(num_ops=8, filler_length=24, data_seed=1234, heldout_sizes={"test": 256, "val": 256})
    test, val = {p.prompt for p in task.heldout("test")}, {p.prompt for p in task.heldout("val")}
    assert len(test) == 256 and len(val) == 256 and not test & val
    train = {p.prompt for p in task.train(0, 2000)[0]}
    assert not train & (test | val)
    # the first split is unchanged by the fix: the study's test set is the same as before
    assert [p.prompt for p in task.heldout("test", 5)] == [task.problem("test", i).prompt for i in range(5)]


def test_early_task_registers_with_one_call():
    from creditlib.rl.config import load_config
    from creditlib.rl.registry import get_dataset, list_datasets
    from creditlib.rl.rewards import reward_for_dataset

    register_tasks()
    register_tasks()  # idempotent
    assert "early" in list_datasets() and get_dataset("early").embedded
    assert reward_for_dataset("early") is early_decision_reward
    cfg = load_config(overrides={"dataset": "early", "num_ops": 8, "eval_size": 16})
    from creditlib.rl.data import build_source
    from creditlib.rl.task import build_char_tokenizer

    src = build_source(cfg, build_char_tokenizer())
    assert isinstance(src.task, EarlyDecisionTask) and src.max_new_tokens == 26
    with pytest.raises(ValueError, match="own tokenizer"):
        load_config(overrides={"dataset": "early", "model": "some/model"})


def test_early_task_plugs_into_the_synthetic_source():
    """Same interface as ChainTask: the recipe's SyntheticSource and char tokenizer take it unchanged."""
    from creditlib.rl.data import SyntheticSource
    from creditlib.rl.task import build_char_tokenizer

    for name in ("problem", "heldout", "train", "iter_train", "completion_length", "num_ops", "data_seed"):
        assert hasattr(ChainTask, name) or name in ("num_ops", "data_seed")
        assert hasattr(EarlyDecisionTask(8, 12, 1, {"test": 8, "val": 8}), name)
    tok = build_char_tokenizer()
    src = SyntheticSource(EarlyDecisionTask(8, 12, 1, {"test": 8, "val": 8}), tok)
    assert src.max_new_tokens == 14
    exs, pos = src.next_batch(0, 4)
    ids, attn, labels = src.encode_sft(exs)  # [4, L] each
    assert ids.shape == labels.shape and ids.shape[1] == 1 + 10 + 13 + 1  # bos + prompt + solution + eos
    assert tok.unk_token_id not in ids.tolist()[0]
    assert (labels[:, 11] == ids[:, 11]).all()  # the decision token is supervised
    assert len(src.heldout(8)) == 8 and len(src.validation(4)) == 4


# --------------------------------------------------------------------------- the late, long and walk tasks

def test_late_and_long_tasks_problems_and_rewards():
    from study.tasks import (LateDecisionTask, LongDecisionTask, extract_first_digit, extract_last,
                             first_digit_reward, late_decision_reward)

    late = LateDecisionTask(num_ops=8, filler_length=24, data_seed=7, heldout_sizes={"test": 64, "val": 32})
    long = LongDecisionTask(num_ops=8, side=32, data_seed=7, heldout_sizes={"test": 64, "val": 32})
    assert late.completion_length == 26 and late.decision_index == 24
    assert long.completion_length == 66 >= 64 and long.decision_index == 32
    for task, reward in ((late, late_decision_reward), (long, first_digit_reward)):
        train, _ = task.train(0, 40)
        for p in train + task.heldout("val", 10):
            assert p.answer == _walk_end(p.prompt) and len(p.prompt) == 10
            assert len(p.solution) == task.completion_length - 1
            assert p.solution[task.decision_index] == p.answer  # the one decisive character
            rest = p.solution[:task.decision_index] + p.solution[task.decision_index + 1:]
            assert not any(ch.isdigit() for ch in rest)  # the filler holds no digit
            assert set(p.solution[:task.decision_index]) <= {"="} and set(rest[task.decision_index:]) <= set("+-")
        assert reward([p.solution for p in train], [p.answer for p in train]) == [1.0] * len(train)
        assert len({p.answer for p in train}) >= 5
        # the same (seed, split, index) -> the same problem
        assert task.problem("train", 3) == type(task)(8, 24 if task is late else 32, 7,
                                                      {"test": 64, "val": 32}).problem("train", 3)
    # late: only the LAST character counts; long: the first digit, wherever it sits
    assert late_decision_reward(["7" + "=" * 23 + "3", "=" * 24 + "7", "3 "], ["3", "3", "3"]) == [1.0, 0.0, 1.0]
    assert first_digit_reward(["=" * 32 + "4" + "5" * 10, "==5=4", "+-+"], ["4", "4", "4"]) == [1.0, 0.0, 0.0]
    assert extract_last("") is None and extract_first_digit("+-=") is None
    with pytest.raises(ValueError, match="same length"):
        late_decision_reward(["1"], [])
    with pytest.raises(ValueError, match="filler_length"):
        LateDecisionTask(filler_length=0)
    with pytest.raises(ValueError, match="before_fill"):
        LateDecisionTask(before_fill="?")
    # the variant filled with the prompt's moves (repeated from the first), same problems
    mv = LateDecisionTask(8, 24, 7, {"test": 64, "val": 32}, before_fill="moves")
    p, q = mv.problem("train", 3), late.problem("train", 3)
    assert p.prompt == q.prompt and p.solution == (p.prompt[1:9] * 3)[:24] + q.answer
    with pytest.raises(ValueError, match="side"):
        LongDecisionTask(side=0)
    # the tasks draw different problems from the same data seed (their generators are named)
    assert late.problem("train", 0).prompt != long.problem("train", 0).prompt


def test_late_and_long_heldout_splits_are_disjoint():
    from study.tasks import LateDecisionTask, LongDecisionTask

    for task in (LateDecisionTask(8, 24, 1234, {"test": 256, "val": 256}), LongDecisionTask(8, 32, 1234,
                                                                                           {"test": 256, "val": 256})):
        test, val = {p.prompt for p in task.heldout("test")}, {p.prompt for p in task.heldout("val")}
        assert len(test) == 256 and len(val) == 256 and not test & val
        assert not {p.prompt for p in task.train(0, 2000)[0]} & (test | val)


def test_study_tasks_register_one_call_each_and_switch_the_heldout_split(monkeypatch):
    """register_tasks adds walk/early/late/long (one register_dataset call each); every source serves
    the test split by default and the val split with STUDY_EVAL_SPLIT=val; walk equals synthetic."""
    import study.tasks as T
    from creditlib.rl import registry
    from creditlib.rl.config import load_config
    from creditlib.rl.data import build_source
    from creditlib.rl.task import build_char_tokenizer

    calls = []
    real = registry.register_dataset
    monkeypatch.setattr(registry, "register_dataset", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    T.register_tasks()
    assert calls == list(T.STUDY_DATASETS)  # one call per task
    tok = build_char_tokenizer()
    expect = {"walk": 13, "early": 26, "late": 26, "long": 66}
    for name in T.DECISION_DATASETS:  # (the credit-bottleneck tasks: tests/test_study_tasks.py)
        spec = registry.get_dataset(name)
        assert spec.embedded
        cfg = load_config(overrides={"dataset": name, "num_ops": 10 if name == "walk" else 8, "eval_size": 16})
        monkeypatch.delenv("STUDY_EVAL_SPLIT", raising=False)
        src = build_source(cfg, tok)
        assert src.max_new_tokens == expect[name]
        test = [e.prompt for e in src.heldout(16)]
        monkeypatch.setenv("STUDY_EVAL_SPLIT", "val")
        src_val = build_source(cfg, tok)
        val = [e.prompt for e in src_val.heldout(16)]
        assert val == [e.prompt for e in src_val.validation(16)] and not set(val) & set(test)
        assert test == [p.prompt for p in src.task.heldout("test", 16)]
        ex = src.heldout(1)[0]  # the reward of a full solution is 1
        assert spec.reward([ex.solution], [ex.answer]) == [1.0]
    monkeypatch.setenv("STUDY_EVAL_SPLIT", "dev")
    with pytest.raises(ValueError, match="STUDY_EVAL_SPLIT"):
        build_source(load_config(overrides={"dataset": "late", "eval_size": 16}), tok)
    monkeypatch.delenv("STUDY_EVAL_SPLIT")
    # walk = the embedded task: same problems, same held-out split, same reward
    cfg = load_config(overrides={"dataset": "walk", "eval_size": 32})
    syn = build_source(load_config(overrides={"dataset": "synthetic", "eval_size": 32}), tok)
    assert [e.prompt for e in build_source(cfg, tok).heldout(32)] == [e.prompt for e in syn.heldout(32)]
    assert build_source(cfg, tok).next_batch(0, 8)[0] == syn.next_batch(0, 8)[0]


# --------------------------------------------------------------------------- lr selection

def test_lr_ladder_tags_and_choice():
    assert S.next_rung(2e-4, 1) == 5e-4 and S.next_rung(2e-5, -1) == 1e-5
    assert S.next_rung(1e-4, 1) == 2e-4 and S.next_rung(1e-4, -1) == 5e-5 and S.next_rung(5e-5, 1) == 1e-4
    assert S.next_rung(3e-4, 1) == 5e-4 and S.next_rung(3e-4, -1) == 2e-4  # off the ladder
    with pytest.raises(ValueError, match="direction"):
        S.next_rung(1e-4, 0)
    assert S.lr_tag(1e-4) == "lr1e-04" and S.lr_tag(2e-5) == "lr2e-05" and S.lr_tag(3.3e-5) == "lr3.3e-05"
    with pytest.raises(ValueError, match="lr"):
        S.lr_tag(0.0)
    assert S.choose_lr({1e-4: [0.5, 0.7], 2e-4: [0.55], 5e-5: [0.4]}) == (1e-4, 0)
    assert S.choose_lr({1e-4: [0.5], 2e-4: [0.6]}) == (2e-4, 1)
    assert S.choose_lr({1e-4: [0.6], 2e-4: [0.5]}) == (1e-4, -1)
    assert S.choose_lr({1e-4: [0.6], 2e-4: [0.6], 5e-4: [0.1]}) == (1e-4, -1)  # ties go to the smaller rate
    assert S.choose_lr({1e-4: [0.3]}) == (1e-4, 0)
    assert S.choose_lr({1e-4: [float("nan")], 2e-4: [0.2]}) == (2e-4, 0)
    with pytest.raises(ValueError, match="finite"):
        S.choose_lr({1e-4: [float("nan")]})
    # the statistic: AUC of greedy accuracy; a NaN-stopped run counts 0 after its stop
    c = _curve([0.5, 0.6, 0.7], [0.1] * 20)
    assert S.selection_score(c, 20) == pytest.approx(S.area_under_curve([0, 10, 20], [0.5, 0.6, 0.7]))
    stopped = _curve([0.5, 0.6], [0.1] * 10, status="stopped")
    assert S.selection_score(stopped, 40) == pytest.approx((0.5 + 0.6) / 2 * 10 / 40)
    assert S.selection_score(stopped, 40) < S.selection_score(_curve([0.5, 0.6], [0.1] * 10), 10)


def _fake_run(d: Path, acc, steps: int, status: str = "done", sampled=None):
    """A run folder as the recipe + runner leave it (metrics.jsonl, study_done.json), with chosen curves."""
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    every = steps // (len(acc) - 1)
    for i, a in enumerate(acc):
        r = {"phase": "eval", "step": i * every, "accuracy": a}
        if sampled is not None:
            r["sampled_accuracy"] = sampled[i]
        recs.append(r)
    recs += [{"phase": "rl", "step": s, "reward": 0.2 + 0.005 * s, "step_seconds": 0.1, "grad_norm": 1.0 + s % 3}
             for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "study_done.json").write_text(json.dumps({"status": status, "max_steps": steps, "wall_seconds": 1.0}))


def test_selection_extends_the_grid_at_an_edge_and_resumes(tmp_path):
    """From run folders with known validation curves: the best rate at the top edge adds the next rung,
    then the choice is fixed; a method whose best is inside its grid needs no extension."""
    ls = _load_runner()
    a = ls.build_parser().parse_args(["--tasks", "default", "--methods", "grpo,clamp", "--seeds", "2",
                                      "--lr-grid", "1e-4,2e-4", "--max-extend", "1", "--max-steps", "20"])
    plan = ls.make_plan(a, ["default"], ["grpo", "clamp"])
    out = tmp_path
    st = ls.selection_state(out, plan, "default", "grpo")
    assert st["lr"] is None and st["todo"] == [1e-4, 2e-4]
    # grpo: better at the larger rate (edge) -> 5e-4 is added
    _fake_run(ls.select_dir(out, "default", "grpo", 1e-4, 1000), [0.5, 0.5, 0.55], 20)
    _fake_run(ls.select_dir(out, "default", "grpo", 2e-4, 1000), [0.5, 0.6, 0.65], 20)
    st = ls.selection_state(out, plan, "default", "grpo")
    assert st["lr"] is None and st["todo"] == [5e-4] and st["extended"] == [5e-4]
    # 5e-4 is the best again, but the extension limit (1) is reached: chosen, flagged as at the edge
    _fake_run(ls.select_dir(out, "default", "grpo", 5e-4, 1000), [0.5, 0.7, 0.7], 20)
    st = ls.selection_state(out, plan, "default", "grpo")
    assert st["lr"] == 5e-4 and st["edge"] == 1 and st["todo"] == []
    # a NaN stop at 5e-4 makes 2e-4 the best (inside the grid)
    _fake_run(ls.select_dir(out, "default", "grpo", 5e-4, 1000), [0.5, 0.7], 10, status="stopped")
    st = ls.selection_state(out, plan, "default", "grpo")
    assert st["lr"] == 2e-4 and st["edge"] == 0
    # clamp: the smaller rate is best -> 5e-5 added; 1e-4 stays best -> inside the grown grid
    _fake_run(ls.select_dir(out, "default", "clamp", 1e-4, 1000), [0.5, 0.6, 0.62], 20)
    _fake_run(ls.select_dir(out, "default", "clamp", 2e-4, 1000), [0.5, 0.4, 0.3], 20)
    assert ls.selection_state(out, plan, "default", "clamp")["todo"] == [5e-5]
    _fake_run(ls.select_dir(out, "default", "clamp", 5e-5, 1000), [0.5, 0.52, 0.55], 20)
    st = ls.selection_state(out, plan, "default", "clamp")
    assert st["lr"] == 1e-4 and st["edge"] == 0 and sorted(st["scores"]) == [5e-5, 1e-4, 2e-4]
    # a single-rate grid selects nothing
    one = ls.make_plan(ls.build_parser().parse_args(["--lr-grid", "3e-4"]), ["default"], ["grpo"])
    assert not one.selecting and ls.selection_state(out, one, "default", "grpo")["lr"] == 3e-4


def test_analysis_and_report_from_run_folders(tmp_path):
    """Tables, summary.json, every figure and the report page from fabricated finished runs (known curves):
    the fast method's ratio to GRPO is 0.5, and the report keeps a hand-written conclusion."""
    ls = _load_runner()
    args = ["--tasks", "late", "--methods", "grpo,clamp", "--seeds", "3", "--lr-grid", "1e-4,2e-4,5e-4",
            "--max-steps", "40", "--bootstrap", "200", "--acc-thresholds", "0.6", "--reward-thresholds", "0.3"]
    plan = ls.make_plan(ls.build_parser().parse_args(args), ["late"], ["grpo", "clamp"])
    out, img = tmp_path / "out", tmp_path / "img"
    for m in ("grpo", "clamp"):
        for lr, acc in ((1e-4, [0.5, 0.55, 0.6, 0.6, 0.6]), (2e-4, [0.5, 0.6, 0.7, 0.7, 0.7]),
                        (5e-4, [0.5, 0.3, 0.2, 0.1, 0.1])):
            _fake_run(ls.select_dir(out, "late", m, lr, 1000), acc, 40)
        for s in range(3):  # grpo reaches 0.6 at step 20, clamp at step 10
            acc = [0.5, 0.55, 0.6, 0.65, 0.7] if m == "grpo" else [0.5, 0.6, 0.65, 0.7, 0.7]
            _fake_run(ls.final_dir(out, "late", m, 2e-4, s), acc, 40, sampled=[0.3, 0.35, 0.4, 0.4, 0.45])
    text, info = ls.analyze(out, plan, [0.6], [0.3], 10, img, 200, 0.05)
    assert "| grpo | 2e-04 |" not in text and "| grpo | 0.0002 | 3 |" in text
    assert "**0.650**" in text  # the chosen rate's validation AUC (trapezoid mean) in bold
    summ = json.loads((out / "summary.json").read_text())
    assert summ["late"]["_lr"] == {"grpo": 2e-4, "clamp": 2e-4}
    assert summ["late"]["_ratios"]["accuracy/0.6"]["clamp"][0] == pytest.approx(0.5)
    assert summ["late"]["clamp"]["final_sampled"][0] == pytest.approx(0.45)
    for name in ("lr", "accuracy", "sampled", "reward", "steps", "forest"):
        assert (img / f"study_late_{name}.png").stat().st_size > 5000, name
    assert any("fastest clamp" in h and "ratio / grpo 0.50" in h for h in info["late"]["headline"])
    rp = tmp_path / "docs" / "results.md"
    ls.write_report(rp, plan, text, info, img, "python benchmarks/learning_study.py ...")
    page = rp.read_text()
    assert page.index("## Conclusion") < page.index("## Headline") < page.index("## Results")
    assert "](../img/study_late_forest.png)" in page and "Not written yet" in page
    # the across-task overview: AUC table with each method's chosen lr, and one forest over tasks
    assert page.index("## Headline") < page.index("## Across tasks") < page.index("## Results")
    assert "| clamp | 0.6" in page and "(0.0002)" in page
    assert (img / "study_overview_forest.png").stat().st_size > 5000
    assert "](../img/study_overview_forest.png)" in page
    rp.write_text(page.replace("_Not written yet: summarise the headline below, plainly, whatever it says._",
                               "Clamp wins here."))
    ls.write_report(rp, plan, text, info, img, "cmd")
    assert "Clamp wins here." in rp.read_text() and "Not written yet" not in rp.read_text()


def test_plan_estimates_and_argument_checks():
    ls = _load_runner()
    a = ls.build_parser().parse_args([])
    plan = ls.make_plan(a, list(ls.TASKS), list(ls.MAIN_METHODS))
    text = plan.describe()
    assert "estimated wall time" in text and all(t in text for t in ls.TASKS)
    e = plan.estimate("default")
    assert e["final_runs"] == len(ls.MAIN_METHODS) * 5 and e["select_runs"] >= len(ls.MAIN_METHODS) * 4
    one = ls.make_plan(ls.build_parser().parse_args(["--lr-grid", "1e-4"]), ["default"], ["grpo"])
    assert one.estimate("default")["select_runs"] == 0
    # by default each task runs its own method list; the full list on default and long
    per_task = ls.make_plan(a, list(ls.TASKS), None)
    assert per_task.methods["default"] == list(ls.MAIN_METHODS) and per_task.methods["long"] == list(ls.LONG_METHODS)
    assert {"grpo-lambda", "grpo-lambda-norm", "gspo", "prefix-gae", "prefix-gae-lambda", "entropy-80-20"} <= \
        set(ls.LONG_METHODS)
    assert set(per_task.methods["late"]) <= set(ls.MAIN_METHODS) and "grpo" in per_task.methods["late"]
    assert per_task.select_steps["default"] == ls.TASKS["default"]["select_steps"]
    assert ls.make_plan(ls.build_parser().parse_args(["--max-steps", "7"]), ["default"], None).select_steps == {"default": 7}
    for bad, match in ((["--seeds", "999-1000"], "below"), (["--select-seeds", "0"], "select-seeds"),
                       (["--lr-grid", "1e-4,-1"], "lr-grid"), (["--lr-grid", "1e-4,1e-4"], "lr-grid"),
                       (["--max-extend", "-1"], "max-extend"), (["--max-steps", "0"], "max-steps")):
        with pytest.raises(ValueError, match=match):
            ls.make_plan(ls.build_parser().parse_args(bad), ["default"], ["grpo"])
    assert ls.check_recipe_args("--group-size 16 --temperature 0.7") == ["--group-size", "16", "--temperature", "0.7"]
    with pytest.raises(ValueError, match="--lr"):
        ls.check_recipe_args("--group-size 4 --lr 1e-3")
    with pytest.raises(SystemExit):
        ls.main(["--recipe-args", "--seed 3", "--plan"])
    for m, opts in ls.METHODS.items():  # every method names a registered credit method the recipe accepts
        from creditlib.credit import list_credits
        from creditlib.rl.config import load_config, resolve_credit

        assert opts["credit"] in list_credits()
        resolve_credit(load_config(overrides=dict(opts, dataset="synthetic")))


# --------------------------------------------------------------------------- the runner

def test_runner_argument_helpers(tmp_path):
    ls = _load_runner()
    assert ls.parse_seeds("3") == [0, 1, 2]
    assert ls.parse_seeds("2-4") == [2, 3, 4]
    assert ls.parse_seeds("0,5") == [0, 5]
    for bad in ("0", "a", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            ls.parse_seeds(bad)
    assert ls.parse_names("main", ls.METHODS, "methods", ls.MAIN_METHODS) == list(ls.MAIN_METHODS)
    assert ls.parse_names("all", ls.TASKS, "tasks") == list(ls.TASKS)
    for bad in ("grpo,nope", "grpo,grpo"):
        with pytest.raises(ValueError, match="--methods"):
            ls.parse_names(bad, ls.METHODS, "methods")
    assert ls.to_flags({"clamp_min": "none", "plot": False, "resume": True, "lam": 0.9}) == \
        ["--clamp-min", "none", "--no-plot", "--resume", "--lam", "0.9"]
    # the method list, by credit name
    assert {"grpo", "clamp", "grpo-lambda", "grpo-lambda-norm", "gspo", "prefix-gae", "prefix-gae-clamp",
            "prefix-gae-lambda", "prefix-gae-lambda-clamp", "entropy-80-20"} <= set(ls.MAIN_METHODS)
    assert {"default", "hard", "early", "late", "long"} <= set(ls.TASKS)
    d = tmp_path / "r"
    d.mkdir()
    assert not ls.is_done(d)
    (d / "study_done.json").write_text(json.dumps({"status": "done", "max_steps": 5}))
    assert ls.is_done(d, 5) and not ls.is_done(d, 6)  # a longer sweep extends it
    (d / "study_done.json").write_text(json.dumps({"status": "stopped", "max_steps": 5}))
    assert ls.is_done(d, 50)  # a non-finite stop is final
    with pytest.raises(FileNotFoundError, match="SFT checkpoint"):
        ls.sft_checkpoint(tmp_path / "nosft")
    with pytest.raises(FileNotFoundError, match="SFT checkpoint"):
        ls.start_flags(tmp_path / "x", tmp_path / "nosft")
    with pytest.raises(SystemExit):
        ls.main(["--seeds", "x", "--dry-run"])


TINY = ("--hidden-size 32 --num-layers 1 --num-heads 2 --intermediate-size 64 --sft-steps 10 "
        "--sft-target-accuracy 0 --sft-eval-every 10 --sft-batch-size 16 --eval-size 32 --prompts-per-step 2 "
        "--group-size 4 --eval-every 2 --save-every 2 --log-samples 64")


def _eval_prompts(run: Path) -> set:
    return {r["prompt"] for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())
            if r.get("phase") == "eval" and r.get("kind") == "greedy"}


@pytest.mark.slow  # recipe runs in subprocesses (the runner's child mode)
def test_tiny_sweep_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    """The late task through the runner's child mode (the study tasks registered, the unmodified
    recipe): GRPO at 2 rates (selection on the validation split) -> 1 reported seed at the chosen rate
    (test split, sampled accuracy), 2 steps, from one shared SFT checkpoint on a frozen code snapshot,
    then the report; a rerun skips everything; a longer rerun extends the run by resuming.
    (Several methods, the forest plot and grid extension: test_analysis_and_report_from_run_folders and
    test_selection_extends_the_grid_at_an_edge_and_resumes, on run folders with known curves.)"""
    from study.tasks import LateDecisionTask

    ls = _load_runner()
    monkeypatch.setenv("STUDY_CODE_ROOT", "")  # main() sets it for --code-snapshot; restored afterwards
    out, img, snap = tmp_path / "study", tmp_path / "img", tmp_path / "code"
    args = ["--tasks", "late", "--methods", "grpo", "--lr-grid", "1e-3,2e-3", "--max-extend", "0",
            "--seeds", "1", "--max-steps", "2", "--select-steps", "2", "--eval-samples", "1", "--jobs", "2",
            "--out", str(out), "--img-dir", str(img), "--recipe-args", TINY, "--bootstrap", "200",
            "--acc-thresholds", "0.0,1.01", "--reward-thresholds", "0.0", "--code-snapshot", str(snap),
            "--report", str(tmp_path / "results.md")]
    assert ls.main(args) == 0
    assert (snap / "creditlib" / "rl" / "train.py").is_file() and (snap / "recipes" / "grpo.py").is_file()
    task = LateDecisionTask(8, 24, 1234, {"test": 32, "val": 256})
    val, test = {p.prompt for p in task.heldout("val", 32)}, {p.prompt for p in task.heldout("test")}
    sft_acc = [r for r in map(json.loads, (out / "late" / "sft" / "metrics.jsonl").read_text().splitlines())
               if r.get("phase") == "eval"][0]["accuracy"]
    choice = json.loads((out / "late" / "lr_choice.json").read_text())
    for m in ("grpo",):
        for lr in (1e-3, 2e-3):
            d = ls.select_dir(out, "late", m, lr, 1000)
            assert json.loads((d / "study_done.json").read_text())["eval_split"] == "val"
            assert _eval_prompts(d) <= val  # selection evaluates on the validation split
            assert f"--credit {m}" in (d / "run.log").read_text() and f"# code: {snap}" in (d / "run.log").read_text()
        lr = choice["methods"][m]["lr"]
        assert lr in (1e-3, 2e-3) and set(choice["methods"][m]["scores"]) == {"lr1e-03", "lr2e-03"}
        d = ls.final_dir(out, "late", m, lr, 0)
        c = S.load_run(d, max_steps=2)
        assert c.status == "done" and list(c.eval_steps) == [0, 2] and c.accuracy[0] == sft_acc
        rl = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "rl"]
        assert all(r["lr"] == lr and r["completion_len"] <= 26 for r in rl)  # 24 + 1 + EOS at most
        assert np.isfinite(c.sampled).all() and 0 <= c.sampled[-1] <= 1  # sampled accuracy logged
        assert _eval_prompts(d) <= test
    text = (out / "results.md").read_text()
    assert "| grpo | " in text and "1 (baseline)" in text
    summ = json.loads((out / "summary.json").read_text())
    assert summ["late"]["grpo"]["accuracy/0.0"]["reached"] == 1      # reached at step 0
    assert summ["late"]["grpo"]["accuracy/1.01"]["reached"] == 0     # unreachable: censored
    for name in ("lr", "accuracy", "sampled", "reward", "steps"):
        assert (img / f"study_late_{name}.png").stat().st_size > 5000
    page = (tmp_path / "results.md").read_text()
    assert "## Conclusion" in page and "total wall time of the invocations" in page and " cores, " in page
    assert json.loads((out / "sweeps.jsonl").read_text().splitlines()[0])["failed"] == 0
    capsys.readouterr()
    # resume: nothing left to run
    assert ls.main(args + ["--no-analyze"]) == 0
    o = capsys.readouterr().out
    assert not re.findall(r"^late: .*: \d+ run\(s\)$", o, re.M)  # no phase had anything to run
    # extend: --max-steps 3 continues the grpo run from its step-2 checkpoint (--resume, not --init-from)
    args[args.index("--max-steps") + 1] = "3"
    assert ls.main(args + ["--no-analyze"]) == 0
    o = capsys.readouterr().out
    assert re.findall(r"^late: .*: \d+ run\(s\)$", o, re.M) == ["late: reported runs (test split): 1 run(s)"]
    d = ls.final_dir(out, "late", "grpo", choice["methods"]["grpo"]["lr"], 0)
    cmds = [x for x in (d / "run.log").read_text().splitlines() if x.startswith("$ ")]
    assert len(cmds) == 2 and "--init-from" in cmds[0] and "--resume" not in cmds[0]
    assert "--resume" in cmds[1] and "--init-from" not in cmds[1]
    c = S.load_run(d, max_steps=3)
    assert c.status == "done" and list(c.rl_steps) == [1, 2, 3]
    assert json.loads((d / "study_done.json").read_text())["max_steps"] == 3


def test_curve_matrix_pads_stopped_runs():
    full = _curve([0.5, 0.6, 0.7, 0.8], [0.1] * 30)
    stopped = _curve([0.5, 0.4], [0.3] * 12, status="stopped")
    x, y = S._curve_matrix([full, stopped], "accuracy", 5)
    np.testing.assert_allclose(x, [0, 10, 20, 30])
    np.testing.assert_allclose(y[1], [0.5, 0.4, np.nan, np.nan])
    x, y = S._curve_matrix([stopped, full], "reward", 5)
    assert x.size == 30 and np.isnan(y[0, 12:]).all() and np.allclose(y[0, :12], 0.3)


def test_shared_start_is_added_when_a_run_did_not_evaluate_step_0(tmp_path):
    ls = _load_runner()
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"phase": "sft", "step": 0, "heldout_accuracy": 0.1}, {"phase": "eval", "step": 0, "accuracy": 0.42}]))
    c = ls.with_shared_start(_curve([0.5, 0.6], [0.1] * 20), sft)  # evaluates at 0: unchanged
    assert c.eval_steps.tolist() == [0, 10] and c.accuracy.tolist() == [0.5, 0.6]
    late = S.RunCurve(eval_steps=[10, 20], accuracy=[0.5, 0.6], rl_steps=np.arange(1, 21), reward=np.zeros(20),
                      step_seconds=np.ones(20))
    c = ls.with_shared_start(late, sft)
    assert c.eval_steps.tolist() == [0, 10, 20] and c.accuracy.tolist() == [0.42, 0.5, 0.6]
    assert ls.with_shared_start(late, tmp_path / "missing").eval_steps.tolist() == [0, 10, 20]
