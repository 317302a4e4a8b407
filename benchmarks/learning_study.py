#!/usr/bin/env python
"""The fair learning study: which credit assignment trains fastest, and where, each method at its own
best learning rate (issue 12; the first study, issue 6, used one rate for all).

For every task: ONE shared supervised warm-up (SFT) run; then, per credit method (a name from
``creditlib.credit``, selected with the recipe's ``--credit``):

1. **lr selection**: one run per learning rate of the grid (default 2e-5, 5e-5, 1e-4, 2e-4) and per
   selection seed (seeds 1000, 1001, ...: never reported), evaluated on the held-out VALIDATION split
   (``STUDY_EVAL_SPLIT=val``). Statistic: the AUC of validation greedy accuracy over the run (its mean
   level, ``study.stats.selection_score``; a NaN-stopped run counts 0 from its stop). When the best
   rate is the grid's smallest or largest, the grid grows by one rung of the 1-2-5 ladder on that side
   (at most ``--max-extend`` times) and the selection repeats.
2. **reported runs**: ``--seeds`` fresh seeds (default 0-4) at the chosen rate, evaluated on the TEST
   split, greedy and sampled (``--eval-samples``).

Every RL run is the unmodified recipe ``recipes/grpo.py`` in a subprocess (``--jobs`` in parallel, one
thread each) started with ``--init-from <task>/sft/checkpoints/step_000000``. Then every run's
``metrics.jsonl`` is read for steps / seconds to fixed thresholds of held-out accuracy and of the
training-reward moving average, final greedy and sampled accuracy, AUC, collapse, gradient norms, 95%
bootstrap intervals and the ratio method / GRPO of steps-to-threshold (``benchmarks/study/stats.py``).

    python benchmarks/learning_study.py --plan                          # sizes and estimated wall time
    python benchmarks/learning_study.py                                 # the whole sweep (resumable)
    python benchmarks/learning_study.py --tasks default,late --methods grpo,grpo-lambda --seeds 3
    python benchmarks/learning_study.py --lr-grid 1e-4 --methods grpo,clamp   # one rate, no selection
    python benchmarks/learning_study.py --analyze-only --report docs/results-study2.md --img-dir docs/img
    python benchmarks/learning_study.py --list                          # tasks and methods

Layout (``--out``, default ``runs/study2``)::

    <out>/<task>/sft/                                the shared warm-up (recipe with --max-steps 0)
    <out>/<task>/select/<method>/lr<LR>/seed<k>/     selection runs (validation split)
    <out>/<task>/lr_choice.json                      the chosen rate per method, with every score
    <out>/<task>/final/<method>/lr<LR>/seed<k>/      reported runs (test split)
    <out>/results.md, summary.json                   the tables (also printed)
    <img-dir>/study_<task>_*.png                     curves, steps bars, forest plot, lr sensitivity

Each run folder holds the recipe's ``metrics.jsonl`` and ``run.log``, and ``study_done.json`` once it
finished. Resume: a finished run is never redone (a longer ``--max-steps`` extends it with
``--resume``); an unfinished one with an intact checkpoint continues with ``--resume``; the reported
runs' folder names carry their rate, so a changed choice never mixes with old runs.

Tasks other than the embedded walk come from ``benchmarks/study/tasks.py``; the child mode
(``--recipe-child``) registers them (one ``register_dataset`` call each) and runs the unmodified
recipe. ``--code-snapshot DIR`` runs the whole sweep on a frozen copy of ``creditlib/``, ``recipes/``
and ``benchmarks/study/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent, _BENCH):  # creditlib (from a checkout) and the study package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The plan, the sweep and the report live in benchmarks/study/; the names below stay importable from here.
from study.plan import (BASELINE, LONG_METHODS, LR_GRID, MAIN_METHODS, METHODS, RESERVED_FLAGS,  # noqa: E402,F401
                        ROOT, SELECT_SEED_BASE, STUDY_DEFAULTS, TASKS, Job, Plan, check_recipe_args,
                        default_plan_text, final_dir, is_done, make_plan, parse_floats, parse_names, parse_seeds,
                        read_done, select_dir, selection_state, to_flags)
from study.report import analyze, censored, headline, with_shared_start, write_report  # noqa: E402,F401
from study.sweep import (Runner, add_sweep_flags, code_root, log_sweep, make_snapshot,  # noqa: E402,F401
                         recipe_child, run_job, sft_checkpoint, start_flags, sweep, sweep_history)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="learning_study.py", description=__doc__, epilog=default_plan_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help=f"comma list of tasks or 'all' ({', '.join(TASKS)}); default: all")
    p.add_argument("--methods", default="task",
                   help=f"'task' (each task's own list, see --list), a comma list of methods, 'main' "
                        f"({', '.join(MAIN_METHODS)}) or 'all' (also "
                        f"{', '.join(m for m in METHODS if m not in MAIN_METHODS)}); default: task")
    p.add_argument("--seeds", default="5", help="reported seeds: a count ('5' = seeds 0..4), a range ('0-4') or a list "
                                                f"('0,3'), all below {SELECT_SEED_BASE}; default: 5")
    p.add_argument("--select-seeds", type=int, default=1,
                   help=f"selection seeds per learning rate ({SELECT_SEED_BASE}, {SELECT_SEED_BASE + 1}, ...; never "
                        "reported); default: 1")
    p.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in LR_GRID),
                   help="learning rates each method is tried at (comma list; one value = no selection); default: "
                        + ",".join(f"{x:g}" for x in LR_GRID))
    p.add_argument("--max-extend", type=int, default=2,
                   help="how many rungs of the 1-2-5 ladder the grid may grow by on a side where the best rate sits "
                        "at its edge (default: 2)")
    p.add_argument("--max-steps", type=int, default=None, help="RL steps of every reported run (default: per task, "
                                                                "see --list)")
    p.add_argument("--select-steps", type=int, default=None, help="RL steps of the selection runs (default: as "
                                                                   "the reported runs)")
    p.add_argument("--eval-samples", type=int, default=1,
                   help="sampled completions per held-out prompt in the reported runs' evaluations (sampled "
                        "accuracy beside greedy; 0 = greedy only); default: 1")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each (default: 2)")
    p.add_argument("--out", default="runs/study2", help="output root (default: runs/study2)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default: <out>/img)")
    p.add_argument("--report", default=None, help="also write the full results page here (e.g. docs/results.md; "
                                                   "its conclusion block is kept)")
    p.add_argument("--recipe-args", default="",
                   help="extra recipe flags for every run, one string (e.g. \"--group-size 16\"), placed last: they "
                        f"override the study defaults {STUDY_DEFAULTS} and the task's options (see recipes/grpo.py "
                        f"--help); the flags the study sets per run ({', '.join(RESERVED_FLAGS)}) are refused")
    p.add_argument("--acc-thresholds", default=None,
                   help="comma list of held-out accuracy thresholds (default: per task, see --list)")
    p.add_argument("--reward-thresholds", default=None,
                   help="comma list of training-reward moving-average thresholds (default: per task, see --list)")
    p.add_argument("--window", type=int, default=10,
                   help="moving-average window of the training reward, steps (default: 10)")
    p.add_argument("--collapse-margin", type=float, default=0.05,
                   help="a run collapses when its last quarter of evaluations all sit this far below its start "
                        "(default: 0.05)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    add_sweep_flags(p)
    p.add_argument("--list", action="store_true", help="print the tasks and methods and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--recipe-child":
        recipe_child(argv[1:])
        return 0
    p = build_parser()
    a = p.parse_args(argv)
    if a.list:
        for n, t in TASKS.items():
            print(f"task {n:8s} {t['desc']}; {t['steps']} steps (selection {t.get('select_steps', t['steps'])}); "
                  f"methods {', '.join(t['methods'])}; overrides {t['overrides']}; thresholds acc {t['acc']} reward MA "
                  f"{t['reward']}")
        for n, v in METHODS.items():
            print(f"method {n:24s} {v}")
        print(f"study defaults (every run): {STUDY_DEFAULTS}")
        return 0
    try:
        tasks = parse_names(a.tasks, TASKS, "tasks")
        methods = None if a.methods == "task" else parse_names(a.methods, METHODS, "methods", MAIN_METHODS)
        plan = make_plan(a, tasks, methods)
        acc_th = parse_floats(a.acc_thresholds, "acc-thresholds")
        rew_th = parse_floats(a.reward_thresholds, "reward-thresholds")
        if a.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
        if a.window < 1:
            raise ValueError(f"--window must be >= 1, got {a.window}")
        check_recipe_args(a.recipe_args)
        if any(BASELINE not in plan.methods[t] for t in tasks):
            print(f"note: {BASELINE} (the baseline of the ratios) is not among the methods of every task", flush=True)
    except ValueError as e:
        p.error(str(e))
    if a.plan:
        print(plan.describe())
        return 0
    out = Path(a.out)
    if not out.is_absolute():
        out = ROOT / out
    img_dir = Path(a.img_dir) if a.img_dir else out / "img"
    if a.code_snapshot and not a.analyze_only and not a.dry_run:
        snap = Path(a.code_snapshot)
        os.environ["STUDY_CODE_ROOT"] = str(make_snapshot(snap if snap.is_absolute() else ROOT / snap))
    base = (to_flags(dict(STUDY_DEFAULTS, progress=False, plot=False)), a.recipe_args.split())  # first, last
    if not a.analyze_only:
        print(plan.describe(), flush=True)
        t_start = time.time()
        failed = sweep(out, plan, base, a.jobs, a.dry_run, a.time_budget)
        if a.dry_run:
            return 0
        log_sweep(out, argv, t_start, time.time(), failed)
        if failed:
            print(f"{failed} run(s) failed", flush=True)
    if not a.no_analyze:
        text, info = analyze(out, plan, acc_th, rew_th, a.window, img_dir, a.bootstrap, a.collapse_margin)
        print(text)
        print(f"tables: {out / 'results.md'}; plots: {img_dir}/study_*.png")
        if a.report:
            rp = Path(a.report)
            rp = rp if rp.is_absolute() else ROOT / rp
            cmd = ".venv/bin/python benchmarks/learning_study.py " + " ".join(x for x in argv if x != "--analyze-only")
            print(f"report: {write_report(rp, plan, text, info, img_dir, cmd, sweep_history(out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
