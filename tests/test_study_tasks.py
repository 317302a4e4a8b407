"""Study 3's tasks where credit assignment should be the bottleneck (issue 20, item 2), in
``benchmarks/study/tasks.py``: ``distractor-F`` (free ``+``/``-`` tokens the reward ignores after every
step of the walk) and ``multi-decision-count`` / ``multi-decision-all`` (several decisive tokens, counted
or all required). Generators, worked solutions, rewards on hand-made completions, held-out splits
disjoint from training, one registry call per task, and 2 RL steps of ``recipes/grpo.py`` on each."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from creditlib.rl.task import ChainTask, build_char_tokenizer, chain_reward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import study.tasks as T  # noqa: E402
from study.tasks import (DistractorTask, MultiDecisionTask, all_decisions_reward, count_decisions_reward,  # noqa: E402
                         distractor_reward, extract_decisions)

SPLITS = {"test": 64, "val": 32}


def _positions(prompt: str):
    """The dial after 0, 1, ..., n moves of a prompt ``d+-...?`` (computed here, not by the task)."""
    pos = [int(prompt[0])]
    for op in prompt[1:-1]:
        pos.append((pos[-1] + (1 if op == "+" else -1)) % 10)
    return pos


# --------------------------------------------------------------------------- distractor

@pytest.mark.parametrize("free", [0, 2, 4])
def test_distractor_problems_and_solutions(free):
    task = DistractorTask(num_ops=8, free=free, data_seed=7, heldout_sizes=SPLITS)
    walk = ChainTask(8, 7, SPLITS)
    assert task.completion_length == 8 * (1 + free) + 3
    train, _ = task.train(0, 60)
    for p in train + task.heldout("val", 10):
        pos = _positions(p.prompt)
        assert len(p.solution) == task.completion_length - 1 and p.answer == str(pos[-1])
        assert [p.solution[i] for i in task.step_indices] == [str(d) for d in pos[1:]]  # the written steps
        assert all(p.solution[i] in "+-" for i in task.free_indices)
        assert len(task.free_indices) == 8 * free and p.solution[-2:] == "=" + p.answer
    assert distractor_reward([p.solution for p in train], [p.answer for p in train]) == [1.0] * len(train)
    # the walk's problems, in the walk's order (distractor-0 IS the walk)
    assert [p.prompt for p in train] == [p.prompt for p in walk.train(0, 60)[0]]
    assert [p.prompt for p in task.heldout("test")] == [p.prompt for p in walk.heldout("test")]
    if free == 0:
        assert train == walk.train(0, 60)[0]
    # a pure function of (seed, split, index)
    assert task.problem("train", 5) == DistractorTask(8, free, 7, SPLITS).problem("train", 5)


def test_distractor_free_tokens_are_uniform_and_ignored_by_the_reward():
    task = DistractorTask(num_ops=8, free=4, data_seed=3, heldout_sizes=SPLITS)
    train, _ = task.train(0, 1500)
    free = [p.solution[i] for p in train for i in task.free_indices]  # 48,000 tokens
    assert abs(free.count("+") / len(free) - 0.5) < 0.01
    # not tied to the move they follow: P(+ | the walk's next move is +) is also 1/2
    after_plus = [p.solution[j * 5 + 1 + f] for p in train for j in range(8) for f in range(4) if p.prompt[1 + j] == "+"]
    assert abs(after_plus.count("+") / len(after_plus) - 0.5) < 0.015
    # the reward ignores every free token: flip them all, or write anything there
    rng = random.Random(0)
    for p in train[:50]:
        s = list(p.solution)
        for i in task.free_indices:
            s[i] = rng.choice("+-")
        flipped = "".join("-" if (i in task.free_indices and ch == "+") else ch for i, ch in enumerate(p.solution))
        assert distractor_reward(["".join(s), flipped], [p.answer] * 2) == [1.0, 1.0]
        wrong = p.solution[:-1] + str((int(p.answer) + 1) % 10)
        assert distractor_reward([wrong, p.solution[:-2]], [p.answer] * 2) == [0.0, 0.0]
    assert distractor_reward(["3+-4--=5", "3=9=5", "35"], ["5", "5", "5"]) == [1.0, 1.0, 0.0]
    assert distractor_reward(["1=2", "1=3"], ["2", "2"]) == chain_reward(["1=2", "1=3"], ["2", "2"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        distractor_reward(["1"], [])
    with pytest.raises(ValueError, match="free"):
        DistractorTask(free=-1)
    with pytest.raises(ValueError, match="num_ops"):
        DistractorTask(num_ops=0)


# --------------------------------------------------------------------------- multi-decision

def test_multi_decision_problems_and_solutions():
    task = MultiDecisionTask(num_ops=8, decisions=4, gap=2, data_seed=7, heldout_sizes=SPLITS)
    assert task.checkpoints == [2, 4, 6, 8] and task.completion_length == 13 and task.decision_indices == [2, 5, 8, 11]
    train, _ = task.train(0, 80)
    for p in train + task.heldout("test", 10):
        pos = _positions(p.prompt)
        assert len(p.prompt) == 10 and p.answer == "".join(str(pos[m]) for m in (2, 4, 6, 8))
        assert p.solution == "".join("==" + d for d in p.answer)
        assert [p.solution[i] for i in task.decision_indices] == list(p.answer)
    for reward in (count_decisions_reward, all_decisions_reward):
        assert reward([p.solution for p in train], [p.answer for p in train]) == [1.0] * len(train)
    assert len({p.answer[k] for p in train for k in range(4)}) == 10  # every digit occurs as a decision
    odd = MultiDecisionTask(num_ops=10, decisions=3, gap=0, data_seed=7, heldout_sizes=SPLITS)
    assert odd.checkpoints == [3, 6, 10] and odd.completion_length == 4 and odd.decision_indices == [0, 1, 2]
    assert task.problem("train", 4) == MultiDecisionTask(8, 4, 2, 7, SPLITS).problem("train", 4)
    for bad, match in (({"decisions": 0}, "decisions"), ({"decisions": 9}, "decisions"), ({"gap": -1}, "gap"),
                       ({"num_ops": 0}, "num_ops")):
        with pytest.raises(ValueError, match=match):
            MultiDecisionTask(**bad)


def test_multi_decision_rewards_count_or_require():
    ans = ["3581"] * 6
    comps = ["==3==5==8==1",   # all four right
             "==3==5==8==2",   # 3 of 4 (the last wrong)
             "==9==5==8==1",   # 3 of 4 (the first wrong)
             "3+5-=0 =2",      # non-digits are ignored, the digits are read in order: 3 5 0 2 -> 2 of 4
             "==3==5",         # 2 of 4: missing decisions are wrong
             "35819999"]       # extra digits after the K-th are ignored
    assert count_decisions_reward(comps, ans) == [1.0, 0.75, 0.75, 0.5, 0.5, 1.0]
    assert all_decisions_reward(comps, ans) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert count_decisions_reward(["", "===="], ["12", "12"]) == [0.0, 0.0]
    assert extract_decisions("a1b2c3", 2) == ["1", "2"] and extract_decisions("==", 3) == []
    with pytest.raises(ValueError, match="same length"):
        count_decisions_reward(["1"], [])
    with pytest.raises(ValueError, match=r"answers\[1\] must be a non-empty string of digits"):
        all_decisions_reward(["1", "2"], ["1", "x"])


# --------------------------------------------------------------------------- splits, registration

@pytest.mark.parametrize("task", [DistractorTask(10, 4, 1234, {"test": 256, "val": 256}),
                                  MultiDecisionTask(8, 4, 2, 1234, {"test": 256, "val": 256})],
                         ids=["distractor", "multi-decision"])
def test_heldout_splits_are_disjoint_from_each_other_and_training(task):
    test, val = {p.prompt for p in task.heldout("test")}, {p.prompt for p in task.heldout("val")}
    assert len(test) == 256 and len(val) == 256 and not test & val
    train = {p.prompt for p in task.train(0, 3000)[0]}
    assert len(train) > 500 and not train & (test | val)
    with pytest.raises(ValueError, match="split"):
        task.heldout("dev")


def _registrations_of_two_calls(monkeypatch, module, fn: str) -> list:
    """The names ``module.fn`` registers during two calls of :func:`register_tasks` (the second one
    must be idempotent), each registration still done by the real function."""
    calls = []
    real = getattr(module, fn)
    monkeypatch.setattr(module, fn, lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    T.register_tasks()
    T.register_tasks()  # idempotent
    return calls


def test_each_task_registers_with_one_call_and_switches_its_heldout_split(monkeypatch):
    from creditlib.rl import registry
    from creditlib.rl.config import load_config
    from creditlib.rl.data import build_source
    from creditlib.rl.rewards import reward_for_dataset

    calls = _registrations_of_two_calls(monkeypatch, registry, "register_dataset")
    assert calls == 2 * list(T.STUDY_DATASETS) and len(set(T.STUDY_DATASETS)) == len(T.STUDY_DATASETS)
    assert set(T.CREDIT_DATASETS) == {f"distractor-{f}" for f in T.DISTRACTOR_FREE} | {"multi-decision-count",
                                                                                      "multi-decision-all"}
    tok = build_char_tokenizer()
    rewards = {"multi-decision-count": count_decisions_reward, "multi-decision-all": all_decisions_reward}
    for name in T.CREDIT_DATASETS:
        spec = registry.get_dataset(name)
        assert spec.embedded and reward_for_dataset(name) is rewards.get(name, distractor_reward)
        cfg = load_config(overrides={"dataset": name, "num_ops": 8, "eval_size": 16})
        monkeypatch.delenv("STUDY_EVAL_SPLIT", raising=False)
        src = build_source(cfg, tok)
        if name.startswith("distractor-"):
            assert isinstance(src.task, DistractorTask) and src.task.free == int(name.split("-")[1])
            assert src.max_new_tokens == 8 * (1 + src.task.free) + 3
        else:
            assert isinstance(src.task, MultiDecisionTask) and src.max_new_tokens == 13
        test = [e.prompt for e in src.heldout(16)]
        monkeypatch.setenv("STUDY_EVAL_SPLIT", "val")
        src_val = build_source(cfg, tok)
        val = [e.prompt for e in src_val.heldout(16)]
        assert val == [e.prompt for e in src_val.validation(16)] and not set(val) & set(test)
        exs = src.heldout(16) + src.next_batch(0, 16)[0]
        assert spec.reward([e.solution for e in exs], [e.answer for e in exs]) == [1.0] * 32  # solutions score 1
        ids, _, labels = src.encode_sft(exs[:4])  # [4, L]: the char tokenizer covers every solution
        assert tok.unk_token_id not in ids.flatten().tolist()
    monkeypatch.delenv("STUDY_EVAL_SPLIT")
    monkeypatch.setenv("STUDY_MULTI_DECISIONS", "2")
    src = build_source(load_config(overrides={"dataset": "multi-decision-all", "num_ops": 8, "eval_size": 16}), tok)
    assert src.task.decisions == 2 and src.max_new_tokens == 7 and len(src.heldout(1)[0].answer) == 2


# --------------------------------------------------------------------------- the recipe on each task

def _grpo():
    spec = importlib.util.spec_from_file_location("recipe_grpo_study3", ROOT / "recipes" / "grpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--num-ops", "8", "--eval-size", "16", "--sft-steps", "4", "--sft-eval-every", "2", "--sft-batch-size", "8",
        "--sft-target-accuracy", "0", "--prompts-per-step", "2", "--group-size", "4", "--no-progress",
        "--num-threads", "1", "--no-plot", "--log-samples", "4"]


@pytest.mark.parametrize("name", T.CREDIT_DATASETS)
def test_the_recipe_runs_two_rl_steps(name, tmp_path, monkeypatch):
    from creditlib.rl.metrics import read_metrics
    from creditlib.rl.registry import get_dataset

    monkeypatch.delenv("STUDY_EVAL_SPLIT", raising=False)
    monkeypatch.delenv("STUDY_MULTI_DECISIONS", raising=False)
    T.register_tasks()
    out = tmp_path / name
    s = _grpo().main(TINY + ["--dataset", name, "--credit", "grpo", "--max-steps", "2", "--eval-every", "2",
                             "--output-dir", str(out), "--seed", "1"])
    assert s["steps"] == 2 and math.isfinite(s["accuracy_after"])
    rl = [r for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2] and all(math.isfinite(r["loss"]) for r in rl)
    reward = get_dataset(name).reward
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert recs
    for r in recs:  # the recipe scored the task's own completions with the task's own reward
        assert r["reward"] == reward([r["completion"]], [r["answer"]])[0]
        assert len(r["answer"]) == (4 if name.startswith("multi") else 1)


# --------------------------------------------------------------------------- the multi-turn task (dial-walk-study)

def test_dial_walk_study_env_registers_and_switches_its_heldout_split(monkeypatch):
    from creditlib.rl import env as env_mod
    from creditlib.rl.config import load_config
    from creditlib.rl.envs import DialWalkEnv, DialWalkScorer, DialWalkSource, parse_dial_prompt

    calls = _registrations_of_two_calls(monkeypatch, env_mod, "register_env")
    assert calls == [T.STUDY_ENV] * 2 and T.STUDY_ENV == "dial-walk-study"
    spec = env_mod.get_env("dial-walk-study")
    assert spec.make_env is DialWalkEnv and isinstance(spec.process_reward, DialWalkScorer) and spec.embedded
    assert env_mod.get_env("dial-walk").name == "dial-walk"  # the bundled one is untouched
    tok = build_char_tokenizer()
    cfg = load_config(overrides={"env": "dial-walk-study", "eval_size": 128, "data_seed": 7})
    ref = DialWalkSource(tok, data_seed=7)
    pairs = lambda exs: [parse_dial_prompt(e.prompt)[::-1] for e in exs]  # noqa: E731  (start, target)

    monkeypatch.delenv("STUDY_EVAL_SPLIT", raising=False)
    src = spec.build_source(cfg, tok)
    assert isinstance(src, T.DialWalkSplitSource) and src.split == "test" and src.data_seed == 7
    test = pairs(src.heldout(cfg.eval_size))
    assert test == ref.heldout_pairs("test") and len(test) == 20  # capped by the pairs, not --eval-size
    assert pairs(src.validation(256)) == ref.heldout_pairs("val")  # the warm-up's stop: always val
    assert [e.solution for e in src.heldout(20)] == [e.solution for e in ref.heldout(20)]  # same demonstrations

    monkeypatch.setenv("STUDY_EVAL_SPLIT", "val")
    src_val = spec.build_source(cfg, tok)
    val = pairs(src_val.heldout(cfg.eval_size))
    assert src_val.split == "val" and val == ref.heldout_pairs("val") and len(val) == 10
    assert pairs(src_val.validation(256)) == val and not set(val) & set(test)
    train = {p for e in src_val.next_batch(0, 2000)[0] for p in pairs([e])}
    assert train == set(ref.train_pairs) and not train & (set(val) | set(test))  # training never sees either split

    monkeypatch.setenv("STUDY_EVAL_SPLIT", "train")
    with pytest.raises(ValueError, match="STUDY_EVAL_SPLIT"):
        spec.build_source(cfg, tok)
    with pytest.raises(ValueError, match="split"):
        T.DialWalkSplitSource(tok, split="train")


@pytest.mark.parametrize("split", ["test", "val"])
def test_the_recipe_runs_the_dial_walk_study_env_on_the_chosen_split(split, tmp_path, monkeypatch):
    from creditlib.rl.envs import DialWalkSource
    from creditlib.rl.metrics import read_metrics

    monkeypatch.setenv("STUDY_EVAL_SPLIT", split)
    T.register_tasks()
    out = tmp_path / split
    i = TINY.index("--num-ops")
    argv = TINY[:i] + TINY[i + 2:]  # no --num-ops: the environment brings its own problems
    s = _grpo().main(argv + ["--env", "dial-walk-study", "--credit", "turn-grpo", "--max-steps", "2",
                             "--eval-every", "2", "--eval-samples", "1", "--output-dir", str(out), "--seed", "1"])
    assert s["steps"] == 2 and math.isfinite(s["accuracy_after"]) and s["sampled_accuracy_after"] is not None
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "eval"]
    assert [r["step"] for r in ev] == [0, 2]
    assert all(0 <= r["sampled_accuracy"] <= 1 and "generated_tokens" in r for r in ev)  # --eval-samples 1
    assert ev[0]["generated_tokens"] == 0 < ev[-1]["generated_tokens"]  # the RL rollouts' policy tokens so far
    want = {e.prompt for e in DialWalkSource(build_char_tokenizer())._split(split, 100)}
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    held = [r for r in recs if r["phase"] == "eval"]
    assert held and {r["prompt"] for r in held} <= want  # evaluated on the chosen split's pairs
