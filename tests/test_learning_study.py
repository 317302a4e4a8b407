"""The learning study (issue 6): statistics on curves with known answers, the early-decision task,
and a tiny end-to-end sweep of ``benchmarks/learning_study.py`` (2 variants x 2 seeds x 3 steps) so
the runner cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from creditlib.rl import study as S
from creditlib.rl.study_tasks import EarlyDecisionTask, early_decision_reward, extract_decision
from creditlib.rl.task import ChainTask

ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- the runner

def test_runner_argument_helpers(tmp_path):
    ls = _load_runner()
    assert ls.parse_seeds("3") == [0, 1, 2]
    assert ls.parse_seeds("2-4") == [2, 3, 4]
    assert ls.parse_seeds("0,5") == [0, 5]
    for bad in ("0", "a", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            ls.parse_seeds(bad)
    assert ls.parse_names("main", ls.VARIANTS, "variants", ls.MAIN_VARIANTS) == list(ls.MAIN_VARIANTS)
    assert ls.parse_names("all", ls.TASKS, "tasks") == list(ls.TASKS)
    with pytest.raises(ValueError, match="--variants"):
        ls.parse_names("grpo,nope", ls.VARIANTS, "variants")
    assert ls.to_flags({"clamp_min": "none", "plot": False, "resume": True, "lam": 0.9}) == \
        ["--clamp-min", "none", "--no-plot", "--resume", "--lam", "0.9"]
    assert ls.VARIANTS["grpo"] == {"lam": 0.0, "clamp_min": "none"}
    d = tmp_path / "r"
    d.mkdir()
    assert not ls.is_done(d)
    (d / "study_done.json").write_text(json.dumps({"status": "done", "max_steps": 5}))
    assert ls.is_done(d, 5) and not ls.is_done(d, 6)  # a longer sweep extends it
    (d / "study_done.json").write_text(json.dumps({"status": "stopped", "max_steps": 5}))
    assert ls.is_done(d, 50)  # a non-finite stop is final
    with pytest.raises(FileNotFoundError, match="SFT checkpoint"):
        ls.prepare_from_sft(tmp_path / "nosft", tmp_path / "x")
    with pytest.raises(SystemExit):
        ls.main(["--seeds", "x", "--dry-run"])


TINY = ("--hidden-size 32 --num-layers 1 --num-heads 2 --intermediate-size 64 --num-ops 6 --sft-steps 30 "
        "--sft-target-accuracy 0 --sft-eval-every 30 --sft-batch-size 16 --eval-size 32 --prompts-per-step 2 "
        "--group-size 4 --eval-every 2 --save-every 2 --lr 1e-3")


def test_tiny_sweep_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    """2 variants x 2 seeds x 3 steps from one shared SFT checkpoint, on a frozen code snapshot; then a
    rerun skips everything and a longer rerun extends the runs by resuming them."""
    ls = _load_runner()
    monkeypatch.setenv("STUDY_CODE_ROOT", "")  # main() sets it for --code-snapshot; restored afterwards
    out = tmp_path / "study"
    img = tmp_path / "img"
    snap = tmp_path / "code"
    args = ["--tasks", "default", "--variants", "grpo,trace_clamp", "--seeds", "2", "--max-steps", "2",
            "--jobs", "2", "--out", str(out), "--img-dir", str(img), "--recipe-args", TINY, "--bootstrap", "200",
            "--acc-thresholds", "0.0,1.01", "--reward-thresholds", "0.0", "--code-snapshot", str(snap)]
    assert ls.main(args) == 0
    assert (snap / "creditlib" / "rl" / "train.py").is_file() and (snap / "recipes" / "grpo_lambda_qwen.py").is_file()
    assert str(snap / "recipes" / "grpo_lambda_qwen.py") in (out / "default" / "grpo" / "seed0" / "run.log").read_text()
    sft_acc = [r for r in map(json.loads, (out / "default" / "sft" / "metrics.jsonl").read_text().splitlines())
               if r.get("phase") == "eval"][0]["accuracy"]
    firsts, lens = {}, {}
    for v in ("grpo", "trace_clamp"):
        for s in (0, 1):
            d = out / "default" / v / f"seed{s}"
            st = json.loads((d / "study_done.json").read_text())
            assert st["status"] == "done" and st["max_steps"] == 2
            c = S.load_run(d, max_steps=2)
            assert c.status == "done" and list(c.eval_steps) == [0, 2]
            assert c.accuracy[0] == sft_acc  # every run starts from the shared SFT checkpoint
            firsts[(v, s)] = c.reward
            rl = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "rl"]
            lens[(v, s)] = [r["completion_len"] for r in rl] + [r["loss"] for r in rl]
    # the seeds sample differently (the RNG follows --seed, not the shared checkpoint)
    assert lens[("grpo", 0)] != lens[("grpo", 1)] and lens[("trace_clamp", 0)] != lens[("trace_clamp", 1)]
    text = (out / "results.md").read_text()
    assert "| grpo | 2 |" in text and "| trace_clamp | 2 |" in text
    assert "1 (baseline)" in text
    summ = json.loads((out / "summary.json").read_text())
    assert summ["default"]["grpo"]["accuracy/0.0"]["reached"] == 2        # reached at step 0
    assert summ["default"]["grpo"]["accuracy/1.01"]["reached"] == 0       # unreachable: censored
    for name in ("accuracy", "reward", "steps"):
        assert (img / f"study_default_{name}.png").stat().st_size > 5000
    capsys.readouterr()
    # resume: nothing left to run
    assert ls.main(args + ["--no-analyze"]) == 0
    assert "0 to run" in capsys.readouterr().out
    # extend: max-steps 3 continues every run from its step-2 checkpoint
    args[args.index("--max-steps") + 1] = "3"
    done = out / "default" / "grpo" / "seed0" / "study_done.json"
    assert ls.main(args) == 0
    assert "4 to run" in capsys.readouterr().out
    c = S.load_run(out / "default" / "grpo" / "seed0", max_steps=3)
    assert c.status == "done" and list(c.rl_steps) == [1, 2, 3]
    assert json.loads(done.read_text())["max_steps"] == 3
    assert c.reward[:2].tolist() == firsts[("grpo", 0)].tolist()  # the first two steps were kept, not redone


def test_recipe_child_runs_the_early_task(tmp_path):
    """The child mode plugs EarlyDecisionTask and its reward into the real recipe (1 RL step, tiny model)."""
    import subprocess

    out = tmp_path / "early"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning_study.py"), "--recipe-child", *TINY.split(),
           "--dataset", "early", "--num-ops", "8", "--max-steps", "1", "--eval-every", "1", "--no-progress",
           "--no-plot", "--num-threads", "1", "--output-dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", STUDY_CODE_ROOT="")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "dataset 'early'" in r.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [x for x in recs if x["phase"] == "rl"]
    assert len(rl) == 1 and 0.0 <= rl[0]["reward"] <= 1.0
    assert rl[0]["completion_len"] <= 24 + 2  # the early task's cap: decision + 24 filler + EOS
    assert [x["step"] for x in recs if x["phase"] == "eval"] == [0, 1]


def test_curve_matrix_pads_stopped_runs():
    full = _curve([0.5, 0.6, 0.7, 0.8], [0.1] * 30)
    stopped = _curve([0.5, 0.4], [0.3] * 12, status="stopped")
    x, y = S._curve_matrix([full, stopped], "accuracy", 5)
    np.testing.assert_allclose(x, [0, 10, 20, 30])
    np.testing.assert_allclose(y[1], [0.5, 0.4, np.nan, np.nan])
    x, y = S._curve_matrix([stopped, full], "reward", 5)
    assert x.size == 30 and np.isnan(y[0, 12:]).all() and np.allclose(y[0, :12], 0.3)
