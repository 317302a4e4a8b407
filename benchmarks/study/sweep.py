"""The study's sweep: runs the plan's recipe runs in subprocesses (one CPU thread each, ``--jobs`` at a
time), task by task: the shared warm-up, the learning-rate selection with grid extension, the
reported seeds; resumable; ``--code-snapshot`` freezes the code the runs import.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from study.plan import (METHODS, RECIPE_REL, ROOT, STUDY_REL, TASKS, Job, Plan, final_dir,
                        is_done, read_done, select_dir, selection_state, to_flags)

#: The command line the runs are started through (``--recipe-child``).
CLI = ROOT / "benchmarks" / "learning_study.py"

_PRINT = threading.Lock()


def _say(msg: str) -> None:
    """Print one message whole (the tasks' chains print from several threads)."""
    with _PRINT:
        print(msg, flush=True)


def add_sweep_flags(p) -> None:
    """The options both study command lines share: how a sweep runs, resumes and reports (an
    ``argparse.ArgumentParser`` ``p``)."""
    p.add_argument("--code-snapshot", default=None,
                   help="run every run with a copy of creditlib/, recipes/ and benchmarks/study/ made in this folder "
                        "at the first call (reused later), so edits to the working tree during a sweep cannot mix code "
                        "versions")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds after which no new run starts (running ones finish; rerun later to continue); 0 = none")
    p.add_argument("--plan", action="store_true",
                   help="print the planned sizes and the estimated wall time, launch nothing")
    p.add_argument("--analyze-only", action="store_true", help="launch nothing; tabulate and plot the finished runs")
    p.add_argument("--no-analyze", action="store_true", help="run, but skip the tables and plots")
    p.add_argument("--dry-run", action="store_true", help="print the commands the next phase would run, launch nothing")


def code_root() -> Path:
    """Where the runs import creditlib and the recipe from: a ``--code-snapshot`` copy, else this checkout."""
    return Path(os.environ.get("STUDY_CODE_ROOT") or ROOT)


def recipe_path() -> Path:
    return code_root() / RECIPE_REL


def make_snapshot(dest: Path) -> Path:
    """Copy ``creditlib/``, ``recipes/`` and ``benchmarks/study/`` into ``dest`` (once): every run of the
    sweep then uses the same code even if the working tree changes while it runs."""
    if (dest / RECIPE_REL).is_file() and (dest / "creditlib" / "__init__.py").is_file() \
            and (dest / STUDY_REL / "tasks.py").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in (Path("creditlib"), RECIPE_REL.parent, STUDY_REL):
        shutil.copytree(ROOT / rel, tmp / rel, ignore=ignore)
    os.replace(tmp, dest)
    return dest


def _child_env(extra: Optional[Dict[str, str]] = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("STUDY_EVAL_SPLIT", None)
    env.update(extra or {})
    env["PYTHONPATH"] = str(code_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def sft_checkpoint(sft_dir: Path) -> Path:
    """The shared warm-up checkpoint every RL run of a task starts from (``--init-from``)."""
    src = sft_dir / "checkpoints" / "step_000000"
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shared SFT checkpoint {src} is missing (did the SFT run fail? see {sft_dir}/run.log)")
    return src


def start_flags(run_dir: Path, sft_dir: Path) -> List[str]:
    """``--resume`` for a run with an intact checkpoint of its own, else ``--init-from`` the shared warm-up."""
    from creditlib.rl.checkpoint import intact_checkpoints

    if intact_checkpoints(run_dir):
        return ["--resume"]
    if (run_dir / "checkpoints").is_dir():
        _say(f"  note: {run_dir} has no intact checkpoint; it restarts from the shared warm-up")
    return ["--init-from", str(sft_checkpoint(sft_dir))]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_job(job: Job, dry_run: bool = False) -> dict:
    """Run one job to completion (blocking); write ``study_done.json`` on success."""
    cmd = [sys.executable, str(CLI), "--recipe-child"] + job.argv
    if dry_run:
        return {"job": job.name, "cmd": cmd, "rc": None, "env": job.env}
    job.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(job.out / "run.log", "a") as log:
        log.write(f"\n$ {' '.join(f'{k}={v}' for k, v in job.env.items())}{' ' if job.env else ''}{' '.join(cmd)}\n")
        log.write(f"# code: {code_root()}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=_child_env(job.env)).returncode
    wall = time.time() - t0
    res = {"job": job.name, "rc": rc, "wall_seconds": wall, "cmd": cmd, "lr": job.lr, "phase": job.phase,
           "eval_split": job.env.get("STUDY_EVAL_SPLIT", "test")}
    prev = read_done(job.out)
    res["wall_seconds"] = wall + prev.get("wall_seconds", 0.0)
    if rc == 0:
        (job.out / "study_done.json").write_text(json.dumps(dict(res, status="done", max_steps=job.steps), indent=1))
    elif rc == 1 and job.phase != "sft" and "stopped at RL step" in _tail(job.out / "run.log"):
        # the recipe's non-finite stop: a finished (stopped) run, counted as collapsed, not redone
        res["status"] = "stopped"
        (job.out / "study_done.json").write_text(json.dumps(dict(res, status="stopped", max_steps=job.steps), indent=1))
    return res


# --------------------------------------------------------------------------- child mode (study tasks)

def recipe_child(argv: List[str]) -> None:
    """Register the study's tasks (one registry call each), then run the unmodified recipe with ``argv``."""
    root = code_root()
    for p in (root / "benchmarks", root):  # a --code-snapshot's creditlib and study package first
        if str(p) in sys.path:
            sys.path.remove(str(p))
        sys.path.insert(0, str(p))
    # the runner itself imported this checkout's study package: forget it, so that a snapshot's is used
    for name in [m for m in sys.modules if m == "study" or m.startswith("study.")]:
        del sys.modules[name]
    from study.tasks import register_tasks

    register_tasks()
    sys.argv = [str(recipe_path())] + list(argv)
    runpy.run_path(str(recipe_path()), run_name="__main__")


def write_choice(out: Path, plan: Plan, task: str, states: Dict[str, dict]) -> None:
    from study.stats import lr_tag

    rec = {"statistic": "mean over selection seeds of the AUC of held-out VALIDATION greedy accuracy "
                        f"(RL steps 0..{plan.select_steps[task]}; a NaN-stopped run counts 0 after its stop)",
           "selection_seeds": plan.select_seeds, "base_grid": plan.grid, "max_extend": plan.max_extend,
           "methods": {m: {"lr": st["lr"], "edge": st["edge"], "extended": st["extended"],
                           "scores": {lr_tag(lr): v for lr, v in sorted(st["scores"].items())}}
                       for m, st in states.items()}}
    (out / task).mkdir(parents=True, exist_ok=True)
    (out / task / "lr_choice.json").write_text(json.dumps(rec, indent=1))


class Runner:
    """Runs job lists on a thread pool, ``jobs`` at a time, until a deadline (``--time-budget``)."""

    def __init__(self, jobs: int, dry_run: bool, deadline: Optional[float], t0: float):
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.dry_run, self.deadline, self.t0 = dry_run, deadline, t0
        self.failed: List[str] = []
        self.skipped: List[str] = []

    def run(self, jobs: List[Job], label: str) -> None:
        if not jobs:
            return
        _say(f"{label}: {len(jobs)} run(s)")

        def guarded(j: Job) -> dict:
            if self.deadline is not None and time.time() > self.deadline:
                self.skipped.append(j.name)
                return {"job": j.name, "rc": None, "skipped": True}
            return run_job(j, self.dry_run)

        futs = [self.pool.submit(guarded, j) for j in jobs]
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            if r.get("skipped"):
                continue
            if self.dry_run:
                env = " ".join(f"{k}={v}" for k, v in r["env"].items())
                _say("DRY " + (env + " " if env else "") + " ".join(r["cmd"]))
                continue
            _say(f"  [{i}/{len(jobs)}] {r['job']}: rc={r['rc']} {r['wall_seconds']:.0f} s "
                 f"(elapsed {time.time() - self.t0:.0f} s)")
            if r["rc"] != 0 and r.get("status") != "stopped":
                self.failed.append(r["job"])

    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def close(self):
        self.pool.shutdown()


def rl_job(out: Path, plan: Plan, base: Tuple[List[str], List[str]], task: str, method: str, lr: float, seed: int,
           phase: str, dry_run: bool) -> Job:
    d = (select_dir if phase == "select" else final_dir)(out, task, method, lr, seed)
    steps = plan.select_steps[task] if phase == "select" else plan.steps[task]
    opts = dict(METHODS[method], lr=lr, seed=seed, max_steps=steps, output_dir=str(d))
    if phase == "final":
        opts["eval_samples"] = plan.eval_samples
    sdir = out / task / "sft"
    start = ["--init-from", str(sdir / "checkpoints" / "step_000000")] if dry_run else start_flags(d, sdir)
    return Job(task, method, seed, d, base[0] + to_flags(TASKS[task]["overrides"]) + to_flags(opts) + base[1] + start,
               phase, lr, steps, {"STUDY_EVAL_SPLIT": "val"} if phase == "select" else {})


def task_pipeline(out: Path, plan: Plan, base: Tuple[List[str], List[str]], task: str, runner: "Runner",
                  dry_run: bool) -> None:
    """One task's chain: its shared warm-up -> lr selection (rounds: every method's missing rates; a best
    rate at an edge adds one rung) -> the reported runs at each method's chosen rate (seed-major: a sweep
    cut short leaves every method equally far). The tasks' chains share the runner's ``--jobs`` slots."""
    sdir = out / task / "sft"
    if not is_done(sdir):
        if sdir.exists() and not dry_run:
            shutil.rmtree(sdir)
        runner.run([Job(task, "sft", 0, sdir, base[0] + to_flags(TASKS[task]["overrides"]) + to_flags(
            {"max_steps": 0, "seed": 0, "output_dir": str(sdir)}) + base[1], "sft")], f"{task}: shared warm-up (SFT)")
    if not (dry_run or is_done(sdir)):
        return
    methods = plan.methods[task]
    for rnd in range(1, 2 * plan.max_extend + 2):  # the grid, then at most max_extend rungs per side
        todo = []
        for s in plan.select_seeds:
            for m in methods:
                for lr in selection_state(out, plan, task, m)["todo"]:
                    if not is_done(select_dir(out, task, m, lr, s), plan.select_steps[task]):
                        todo.append(rl_job(out, plan, base, task, m, lr, s, "select", dry_run))
        runner.run(todo, f"{task}: lr selection, round {rnd} (validation split)")
        if not todo or dry_run or runner.expired():
            break
    states = {m: selection_state(out, plan, task, m) for m in methods}
    if not dry_run:
        write_choice(out, plan, task, states)
    waiting = [m for m in methods if states[m]["lr"] is None]
    if waiting:
        _say(f"{task}: " + ("(dry run) reported runs follow the selection of " if dry_run else
                            "selection unfinished, no reported runs yet for ") + ", ".join(waiting))
    final = [rl_job(out, plan, base, task, m, states[m]["lr"], s, "final", dry_run)
             for s in plan.seeds for m in methods
             if states[m]["lr"] is not None and not is_done(final_dir(out, task, m, states[m]["lr"], s),
                                                            plan.steps[task])]
    runner.run(final, f"{task}: reported runs (test split)")


def run_chains(order: List[str], chain, jobs: int, dry_run: bool, time_budget: float) -> int:
    """Run ``chain(task, runner)`` for every task of ``order`` concurrently, their runs sharing one
    :class:`Runner` of ``jobs`` slots (submission order = queue order of the first runs); report runs the
    ``time_budget`` left unstarted and failed runs. Returns the number of failed runs. Both studies' sweeps
    (:func:`sweep`, :func:`study.three.sweep3`) are this with their own chain and task order."""
    t0 = time.time()
    runner = Runner(jobs, dry_run, t0 + time_budget if time_budget else None, t0)
    try:
        with ThreadPoolExecutor(max_workers=len(order)) as drivers:
            futs = []
            for t in order:
                futs.append(drivers.submit(chain, t, runner))
                time.sleep(0.05)  # submission order = queue order of the first jobs
            for f in futs:
                f.result()
    finally:
        runner.close()
    if runner.skipped:
        print(f"--time-budget {time_budget:.0f} s reached: {len(runner.skipped)} run(s) not started (rerun to "
              f"continue)", flush=True)
    if runner.failed:
        print(f"failed (see their run.log; rerun to retry): {', '.join(runner.failed)}", flush=True)
    print(f"sweep wall time: {time.time() - t0:.0f} s", flush=True)
    return len(runner.failed)


def sweep(out: Path, plan: Plan, base: Tuple[List[str], List[str]], jobs: int, dry_run: bool, time_budget: float) -> int:
    """Every task's chain (:func:`task_pipeline`), concurrently, on ``jobs`` shared slots; the task with the
    costliest warm-up starts first. Returns the number of failed runs."""
    order = sorted(plan.tasks, key=lambda t: -TASKS[t]["cost"]["sft"])
    return run_chains(order, lambda t, runner: task_pipeline(out, plan, base, t, runner, dry_run), jobs, dry_run,
                      time_budget)


def machine() -> str:
    """One line: CPU model, cores, Python / torch versions."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover - the recipes need torch anyway
        tv = "n/a"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {tv}"


def log_sweep(out: Path, argv: List[str], start: float, end: float, failed: int) -> None:
    """Append one invocation (UTC start / end, wall seconds, arguments, machine) to ``<out>/sweeps.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    rec = {"start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
           "end": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end)), "wall_seconds": round(end - start, 1),
           "argv": argv, "failed": failed, "machine": machine()}
    with open(out / "sweeps.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def sweep_history(out: Path) -> List[str]:
    """The invocations of ``<out>/sweeps.jsonl`` as Markdown list items, then their total wall time."""
    f = out / "sweeps.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    lines = [f"- {r['start']} -> {r['end']}: {r['wall_seconds'] / 60:.1f} min, {r['failed']} failed, on "
             f"{r['machine']}: `{' '.join(r['argv'])}`" + (f" ({r['note']})" if r.get("note") else "") for r in recs]
    if recs:
        lines.append(f"- total wall time of the invocations: {sum(r['wall_seconds'] for r in recs) / 60:.1f} min")
    return lines or ["- no sweep invocation recorded in this output folder"]
