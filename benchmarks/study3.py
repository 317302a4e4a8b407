#!/usr/bin/env python
"""Study 3 (issue 20): which credit assignment learns fastest per generated token and per step, on
tasks where credit assignment should be the bottleneck, from independent warm-ups.

For every task (``benchmarks/study/three.py``: TASKS, ARMS):

1. one supervised warm-up PER SEED (reported seeds 0-4, selection seeds 1000-1001), each stopping
   when the mean of its last 3 validation evaluations reaches 0.45;
2. each arm's learning rate chosen on the selection seeds (validation split, the reported runs'
   number of steps, greedy AUC);
3. the reported runs: every arm, every seed, from that seed's warm-up, at the arm's chosen rate,
   evaluated every 5 steps on the test split (greedy and sampled) with the generated tokens so far.

Every run is the unmodified recipe ``recipes/grpo.py`` in a subprocess (``--jobs`` in parallel, one
thread each). The sweep resumes: a finished run is never redone.

    python benchmarks/study3.py --plan                      # sizes and estimated wall time; launches nothing
    nice python benchmarks/study3.py                        # the whole sweep (resumable), then the report
    python benchmarks/study3.py --analyze-only --report docs/results.md --img-dir docs/img
    python benchmarks/study3.py --tasks multi-decision-count --arms grpo,grpo-lambda --seeds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent, _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from study.plan import ROOT  # noqa: E402
from study.sweep import add_sweep_flags, log_sweep, make_snapshot, recipe_child, sweep_history  # noqa: E402
from study.three import ARMS, LR_GRID, TASKS, default_plan, make_plan3, sweep3  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study3.py", description=__doc__, epilog=default_plan().describe(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help=f"comma list of tasks or 'all' ({', '.join(TASKS)}); default: all")
    p.add_argument("--arms", default="task", help=f"'task' (each task's own arms) or a comma list of arms from "
                                                  f"{', '.join(ARMS)}; default: task")
    p.add_argument("--seeds", default="5", help="reported seeds: a count ('5' = 0..4), a range or a list; default: 5")
    p.add_argument("--select-seeds", type=int, default=2, help="selection seeds (1000, 1001, ...), each with its own "
                                                               "warm-up; default: 2")
    p.add_argument("--lr-grid", default=None,
                   help="learning rates each arm of every task is tried at (one value = no selection); default: each "
                        "task's own grid (dial-walk: 1e-4,1e-3), else " + ",".join(f"{x:g}" for x in LR_GRID))
    p.add_argument("--max-steps", type=int, default=None, help="RL steps of every run (default: per task, 50)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="sampled completions per held-out prompt (default: each task's own: 4 on dial-walk, else 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each (default: 2)")
    p.add_argument("--out", default="runs/study3", help="output root (default: runs/study3)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default: <out>/img)")
    p.add_argument("--report", default=None, help="also write the results page here (e.g. docs/results.md)")
    p.add_argument("--recipe-args", default="", help="extra recipe flags for every run, one string, placed last")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    add_sweep_flags(p)
    p.add_argument("--pack", default=None, metavar="DIR",
                   help="write DIR/study3-runs.tar.xz (every run's metrics.jsonl, study_done.json and command, the lr "
                        "choices, the sweep log: what --analyze-only reads) and DIR/study3-warmups.tar.xz (the reported "
                        "seeds' warm-up checkpoints of the main tasks), then exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--recipe-child":
        recipe_child(argv[1:])
        return 0
    p = build_parser()
    a = p.parse_args(argv)
    try:
        plan = make_plan3(a.tasks, a.arms, a.seeds, a.select_seeds, a.lr_grid, a.max_steps, a.eval_samples, a.jobs)
        from study.plan import check_recipe_args

        check_recipe_args(a.recipe_args)
    except ValueError as e:
        p.error(str(e))
    if a.plan:
        print(plan.describe())
        return 0
    out = Path(a.out)
    out = out if out.is_absolute() else ROOT / out
    if (a.analyze_only or a.pack) and not out.is_dir():
        p.error(f"--out {out}: no such folder, so no runs to analyse; run the sweep first, or unpack the "
                "shipped runs: mkdir -p runs && tar -xJf benchmarks/study/results/study3-runs.tar.xz -C runs")
    if a.pack:
        from study.three import pack

        for f in pack(out, plan, Path(a.pack)):
            print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB)")
        return 0
    img_dir = Path(a.img_dir) if a.img_dir else out / "img"
    if a.code_snapshot and not a.analyze_only and not a.dry_run:
        snap = Path(a.code_snapshot)
        os.environ["STUDY_CODE_ROOT"] = str(make_snapshot(snap if snap.is_absolute() else ROOT / snap))
    if not a.analyze_only:
        print(plan.describe(), flush=True)
        t0 = time.time()
        failed = sweep3(out, plan, a.jobs, a.recipe_args.split(), a.dry_run, a.time_budget)
        if a.dry_run:
            return 0
        log_sweep(out, ["benchmarks/study3.py"] + argv, t0, time.time(), failed)
    if not a.no_analyze:
        from study.report3 import analyze3, write_page

        text, info = analyze3(out, plan, img_dir, a.bootstrap)
        print(text)
        if a.report:
            rp = Path(a.report)
            rp = rp if rp.is_absolute() else ROOT / rp
            write_page(rp, text, info, sweep_history(out))
            print(f"report: {rp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
