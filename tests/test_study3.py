"""Study 3's plan, sweep and analysis (benchmarks/study3.py, benchmarks/study/three.py, report3.py).

Known-answer tests of the statistics (exact permutation p-values, token-axis AUC, half-gap), the
arm table against the recipe's own parser, the page markers, and one tiny end-to-end sweep through
the runner's child mode: per-seed warm-ups, selection on the validation split, reported runs from
their own seed's warm-up, then the report (slow: recipe processes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from creditlib.rl.config import parse_args  # noqa: E402
from study import report3 as R  # noqa: E402
from study import three as T  # noqa: E402


def _load_cli():
    spec = importlib.util.spec_from_file_location("study3_cli", ROOT / "benchmarks" / "study3.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("study3_cli", mod)
    spec.loader.exec_module(mod)
    return mod


def test_every_arm_and_task_parses_with_the_recipe_parser():
    from study.tasks import register_tasks

    register_tasks()
    for task, spec in T.TASKS.items():
        for arm in spec["arms"]:
            warm, rl = T.recipe_flags(task, arm, 1e-4, 3)
            cw = parse_args(warm)
            assert cw.max_steps == 0 and cw.seed == 3 and cw.sft_target_window == 3 and cw.eval_every == 5
            flags = [x for i, x in enumerate(rl) if x != "--init-from" and (i == 0 or rl[i - 1] != "--init-from")]
            cr = parse_args(flags)
            assert cr.seed == 3 and cr.lr == 1e-4
            if "env" in spec["overrides"]:  # multi-turn: the environment, 4 sampled episodes per held-out pair
                assert cr.env == spec["overrides"]["env"] and cr.eval_samples == 4 and cw.sft_target_accuracy == 0
            else:
                assert cr.dataset == spec["overrides"]["dataset"] and cr.eval_samples == 1
            assert cr.credit == T.ARMS[arm]["credit"]
            assert rl[rl.index("--init-from") + 1].endswith(f"{task}/warmup/seed3/checkpoints/step_000000")
            if "tree" in arm:
                assert cr.tree_roots * (1 + cr.tree_forks * cr.tree_branches) == cr.group_size
            if arm.startswith("offpolicy"):
                assert cr.ppo_epochs == 2 and cr.prompts_per_step * cr.group_size // cr.minibatch_size == 2


def test_plan_and_argument_errors():
    p = T.make_plan3("all", "task", "5", 2, None, None, None, 2)
    assert p.seeds == [0, 1, 2, 3, 4] and p.select_seeds == [1000, 1001] and p.selecting
    assert p.grid_of("dial-walk") == [1e-4, 1e-3] and p.grid_of("distractor-4") == [2e-5, 1e-4]
    assert p.samples_of("dial-walk") == 4 and p.samples_of("distractor-4") == 1
    q = T.make_plan3("all", "task", "5", 2, "3e-4,1e-3", None, 2, 2)  # explicit: every task
    assert q.grid_of("distractor-4") == [3e-4, 1e-3] and q.samples_of("dial-walk") == 2
    assert "estimated wall time" in p.describe() and "distractor-4" in p.describe()
    for bad in (("nope", "task", "5", 2, "1e-4", None, 1, 2), ("all", "grpo,zzz", "5", 2, "1e-4", None, 1, 2),
                ("all", "task", "0-1000", 2, "1e-4", None, 1, 2), ("all", "task", "5", 0, "1e-4", None, 1, 2),
                ("all", "task", "5", 2, "1e-4,-1", None, 1, 2), ("all", "task", "5", 2, "1e-4", 0, 1, 2)):
        with pytest.raises(ValueError):
            T.make_plan3(*bad)


def test_analyze_only_without_runs_names_the_folder_and_the_archive(tmp_path, capsys):
    # a fresh clone has no runs/study3: a clear error, not a traceback from writing the tables
    missing = tmp_path / "no-runs-here"
    with pytest.raises(SystemExit) as e:
        _load_cli().main(["--analyze-only", "--out", str(missing)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(missing) in err and "study3-runs.tar.xz" in err
    assert not missing.exists()


def test_exact_permutation_p_values_known_answers():
    # all five differences positive: only the identity and the all-flipped sign patterns are as extreme
    assert R.paired_signflip_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert R.paired_signflip_p([1, -1, 1, -1, 0]) == pytest.approx(1.0)
    # fully separated groups of 5: 2 of the C(10, 5) = 252 relabellings are as extreme
    assert R.unpaired_perm_p([10, 11, 12, 13, 14], [0, 1, 2, 3, 4]) == pytest.approx(2 / 252)
    assert R.unpaired_perm_p([1, 2], [1, 2]) == pytest.approx(1.0)
    assert math.isnan(R.paired_signflip_p([]))


def test_auc_on_steps_and_on_a_token_budget():
    x = np.array([0.0, 10.0, 20.0])
    y = np.array([0.0, 1.0, 1.0])
    assert R.auc(x, y) == pytest.approx(0.75)          # (5 + 10) / 20
    assert R.auc(x, y, upto=10.0) == pytest.approx(0.5)
    assert R.auc(x, y, upto=5.0) == pytest.approx(0.25)  # interpolated to 0.5 at x = 5
    assert math.isnan(R.auc(np.array([0.0]), np.array([1.0])))


def test_half_gap_reached_and_censored():
    run = {"steps": np.array([0.0, 5, 10, 15]), "tokens": np.array([0.0, 100, 200, 300]),
           "greedy": np.array([0.4, 0.6, 0.71, 0.9])}
    assert R.half_gap(run, "greedy") == (10.0, 200.0, True)   # target 0.4 + 0.3 = 0.7
    run["greedy"] = np.array([0.4, 0.5, 0.6, 0.65])
    assert R.half_gap(run, "greedy") == (15.0, 300.0, False)


def test_page_markers_keep_the_hand_written_text(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nConclusion by hand.\n")
    R.write_page(page, "table 1", {}, ["- run"])
    R.write_page(page, "table 2", {}, ["- run"])
    text = page.read_text()
    assert text.startswith("# Results\n\nConclusion by hand.") and "table 2" in text and "table 1" not in text
    assert text.count(R.BEGIN) == 1 and text.count(R.END) == 1


TINY = ("--hidden-size 32 --num-layers 1 --num-heads 2 --intermediate-size 64 --sft-steps 10 --sft-eval-every 10 "
        "--sft-batch-size 16 --eval-size 16 --prompts-per-step 2 --group-size 8 --eval-every 2 --save-every 2")


@pytest.mark.slow  # recipe runs in subprocesses (the runner's child mode)
def test_tiny_sweep_independent_warmups_selection_report(tmp_path, monkeypatch, capsys):
    cli = _load_cli()
    monkeypatch.setenv("STUDY_CODE_ROOT", "")
    out = tmp_path / "s3"
    args = ["--tasks", "multi-decision-count", "--arms", "grpo,tree-prefix-gae", "--seeds", "2", "--select-seeds", "1",
            "--lr-grid", "1e-3,2e-3", "--max-steps", "2", "--out", str(out), "--img-dir", str(tmp_path / "img"),
            "--recipe-args", TINY, "--bootstrap", "200", "--report", str(tmp_path / "results.md")]
    assert cli.main(args) == 0
    task = out / "multi-decision-count"
    # one warm-up per seed, each with its own seed (different weights)
    starts = {}
    for s in (0, 1, 1000):
        w = task / "warmup" / f"seed{s}"
        assert json.loads((w / "study_done.json").read_text())["status"] == "done"
        assert f"--seed {s} " in (w / "run.log").read_text()
        starts[s] = (w / "checkpoints" / "step_000000" / "model.safetensors").read_bytes()
    assert len(set(starts.values())) == 3
    choice = json.loads((task / "lr_choice.json").read_text())["arms"]
    for arm in ("grpo", "tree-prefix-gae"):
        assert set(choice[arm]["scores"]) == {"lr1e-03", "lr2e-03"}
        for s in (0, 1):
            d = T.run_dir(out, "multi-decision-count", "final", arm, choice[arm]["lr"], s)
            log = (d / "run.log").read_text()
            assert f"warmup/seed{s}/checkpoints/step_000000" in log  # its own seed's warm-up
            run = R.read_run(d)
            assert list(run["steps"]) == [0, 2] and np.isfinite(run["sampled"]).all()
            assert run["tokens"][-1] > 0
        sel = T.run_dir(out, "multi-decision-count", "select", arm, 1e-3, 1000)
        assert json.loads((sel / "study_done.json").read_text())["eval_split"] == "val"
    text = (out / "results3.md").read_text()
    assert "| tree-prefix-gae |" in text and "p (paired sign-flip, exact)" in text and "seed" in text
    assert (tmp_path / "img" / "study3_multi-decision-count.png").stat().st_size > 5000
    capsys.readouterr()
    # --analyze-only reproduces the tables exactly
    assert cli.main(args + ["--analyze-only"]) == 0
    assert (out / "results3.md").read_text() == text
    # a rerun has nothing left to run
    assert cli.main(args + ["--no-analyze"]) == 0
    assert "run(s)" not in capsys.readouterr().out.split("estimated wall time")[1]
