#!/usr/bin/env python
"""The learning study: does GRPO-lambda train faster than GRPO? (issue 6)

Trains, from ONE shared supervised (SFT) checkpoint per task, GRPO and GRPO-lambda variants over
several seeds with the recipe ``recipes/grpo_lambda_qwen.py`` (one subprocess per run, ``--jobs`` in
parallel, one thread each), then reads every run's ``metrics.jsonl`` and reports steps / seconds to
fixed thresholds of held-out accuracy and of the training-reward moving average, final accuracy,
area under the accuracy curve, collapse rates, bootstrap 95% intervals and the ratio
variant / GRPO of steps-to-threshold with its interval (``creditlib.rl.study``).

    python benchmarks/learning_study.py                                   # main grid, default task
    python benchmarks/learning_study.py --tasks default,hard --variants grpo,clamp,trace,trace_clamp --seeds 5
    python benchmarks/learning_study.py --variants all --seeds 0-4 --max-steps 200
    python benchmarks/learning_study.py --analyze-only --img-dir docs/img  # tables + plots of what ran
    python benchmarks/learning_study.py --list                            # tasks and variants

Layout (``--out``, default ``runs/study``)::

    <out>/<task>/sft/                    the shared warm-up run (recipe with --max-steps 0)
    <out>/<task>/<variant>/seed<k>/      one RL run: metrics.jsonl, run.log, study_done.json
    <out>/results.md, summary.json       the tables (also printed)
    <img-dir>/study_<task>_*.png         accuracy / reward-MA curves with seed bands, steps-to-threshold bars

Shared start: each RL run directory is seeded with the SFT run's step-0 checkpoint (model and a fresh
optimizer) and its metrics (the step-0 held-out accuracy), minus the RNG file, and the recipe is
started with ``--resume``: every variant and seed starts from the same weights; the sampling stream
then follows ``--seed``. Resume: a run with ``study_done.json`` is skipped; an unfinished one is
continued with ``--resume`` from its latest checkpoint.

The ``early`` task (:class:`creditlib.rl.study_tasks.EarlyDecisionTask`) runs through this script's
child mode (``--recipe-child``), which plugs the task and its reward into the recipe, unless the
recipe itself accepts ``--dataset early``. ``--code-snapshot DIR`` runs the whole sweep on a frozen copy of
``creditlib/`` and the recipe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RECIPE_REL = Path("recipes") / "grpo_lambda_qwen.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def code_root() -> Path:
    """Where the runs import creditlib and the recipe from: a ``--code-snapshot`` copy, else this checkout."""
    return Path(os.environ.get("STUDY_CODE_ROOT") or ROOT)


def recipe_path() -> Path:
    return code_root() / RECIPE_REL


def make_snapshot(dest: Path) -> Path:
    """Copy ``creditlib/`` and the recipe into ``dest`` (once): every run of the sweep then uses the same code
    even if the working tree changes while it runs."""
    if (dest / RECIPE_REL).is_file() and (dest / "creditlib" / "__init__.py").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(ROOT / "creditlib", tmp / "creditlib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (tmp / RECIPE_REL).parent.mkdir(parents=True)
    shutil.copy2(ROOT / RECIPE_REL, tmp / RECIPE_REL)
    os.replace(tmp, dest)
    return dest

# --------------------------------------------------------------------------- registries

#: task name -> (recipe overrides, description, default held-out accuracy thresholds, reward-MA thresholds)
TASKS: Dict[str, dict] = {
    "default": {"overrides": {"sft_target_accuracy": 0.45},
                "desc": "embedded dial walk, 10 moves (completion 13 tokens); SFT to greedy val acc 0.45",
                "acc": (0.60, 0.65), "reward": (0.30, 0.35)},
    "hard": {"overrides": {"num_ops": 16, "sft_target_accuracy": 0.65, "sft_steps": 800},
             "desc": "dial walk, 16 moves (completion 19 tokens); SFT to greedy val acc 0.65",
             "acc": (0.80, 0.85), "reward": (0.20, 0.25)},
    "early": {"overrides": {"dataset": "early", "num_ops": 8, "sft_target_accuracy": 0.45, "sft_steps": 800},
              "desc": "early decision: 8-move walk, answer = first token, then 24 filler tokens that do not matter; "
                      "SFT to greedy val acc 0.45",
              "acc": (0.60, 0.65), "reward": (0.40, 0.45)},
}
EARLY_FILLER = 24

#: variant name -> recipe overrides (every other option is the recipe default or --recipe-args)
VARIANTS: Dict[str, dict] = {
    "grpo": {"lam": 0.0, "clamp_min": "none"},
    "clamp": {"lam": 0.0, "clamp_min": -0.1},
    "trace": {"lam": 0.99, "trace_style": "recent", "trace_eps": 0.0, "clamp_min": "none"},
    "trace_clamp": {"lam": 0.99, "trace_style": "recent", "trace_eps": 0.0, "clamp_min": -0.1},
    "both": {"lam": 0.99, "trace_style": "both", "trace_eps": 0.0, "clamp_min": -0.1},
    "eps": {"lam": 0.9, "trace_style": "recent", "trace_eps": 0.3, "clamp_min": -0.1},
    "lam0.9": {"lam": 0.9, "trace_style": "recent", "trace_eps": 0.0, "clamp_min": -0.1},
    "lam0.95": {"lam": 0.95, "trace_style": "recent", "trace_eps": 0.0, "clamp_min": -0.1},
}
MAIN_VARIANTS = ("grpo", "clamp", "trace", "trace_clamp")
BASELINE = "grpo"

#: options every run of the study gets (before --recipe-args, which can override them)
STUDY_DEFAULTS = {"lr": 1e-4, "warmup_steps": 0, "prompts_per_step": 8, "group_size": 8, "temperature": 1.0, "clip_eps": 0.2,
                  "aggregation": "token-mean", "advantage_scale": "std", "max_grad_norm": 1.0, "ppo_epochs": 1,
                  "eval_every": 10, "eval_size": 256, "sft_eval_every": 10, "save_every": 50, "keep_checkpoints": 1, "num_threads": 1}


@dataclass
class Job:
    task: str
    variant: str  # "sft" for the warm-up
    seed: int
    out: Path
    argv: List[str]
    child: bool  # launch through --recipe-child

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}" if self.variant != "sft" else f"{self.task}/sft"


# --------------------------------------------------------------------------- helpers

def parse_seeds(spec: str) -> List[int]:
    """``"5"`` -> 0..4; ``"0-4"`` -> 0..4; ``"1,3,7"`` -> those."""
    spec = spec.strip()
    try:
        if spec.isdigit():
            n = int(spec)
            if n < 1:
                raise ValueError
            return list(range(n))
        out: List[int] = []
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds expects a count ('5'), a range ('0-4') or a list ('0,2,5'), got {spec!r}") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"--seeds must name distinct non-negative seeds, got {spec!r}")
    return out


def parse_names(spec: str, registry: Dict[str, dict], what: str, main: Sequence[str] = ()) -> List[str]:
    if spec == "all":
        return list(registry)
    if spec == "main" and main:
        return list(main)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in registry]
    if bad or not names:
        raise ValueError(f"--{what} must be 'all'{', main' if main else ''} or a comma list of {list(registry)}, got {spec!r}")
    return names


def parse_floats(spec: Optional[str], what: str) -> Optional[List[float]]:
    if spec is None:
        return None
    try:
        vals = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--{what} expects a comma list of numbers, got {spec!r}") from None
    return vals


def to_flags(opts: Dict[str, object]) -> List[str]:
    """``{"clamp_min": -0.1, "plot": False}`` -> ``["--clamp-min", "-0.1", "--no-plot"]``."""
    out: List[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def recipe_supports(dataset: str) -> bool:
    """Whether the recipe's ``--help`` names ``dataset`` as a --dataset value."""
    try:
        r = subprocess.run([sys.executable, str(recipe_path()), "--help"], capture_output=True, text=True, timeout=120,
                           env=_child_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"'{dataset}'" in r.stdout


def _child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(code_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def is_done(out: Path, max_steps: int = 0) -> bool:
    """A run is finished when its ``study_done.json`` says so for at least ``max_steps`` RL steps
    (or it was stopped by a non-finite loss); a run finished with fewer steps is extended by resuming."""
    f = out / "study_done.json"
    if not f.is_file():
        return False
    try:
        st = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    return st.get("status") == "stopped" or int(st.get("max_steps", 0)) >= max_steps


def prepare_from_sft(sft_dir: Path, out: Path) -> None:
    """Seed ``out`` with the SFT run's step-0 checkpoint (no RNG file) and its metrics."""
    src = sft_dir / "checkpoints" / "step_000000"
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shared SFT checkpoint {src} is missing (did the SFT run fail? see {sft_dir}/run.log)")
    if out.exists():
        shutil.rmtree(out)
    dst = out / "checkpoints" / "step_000000"
    dst.parent.mkdir(parents=True)
    shutil.copytree(src, dst)
    rng = dst / "rng_rank0.safetensors"
    if rng.exists():
        rng.unlink()  # the sampling stream then follows --seed
    (out / "checkpoints" / "latest").write_text("step_000000")
    shutil.copy2(sft_dir / "metrics.jsonl", out / "metrics.jsonl")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_job(job: Job, max_steps: int, dry_run: bool = False) -> dict:
    """Run one job to completion (blocking); write ``study_done.json`` on success."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe-child"] if job.child \
        else [sys.executable, str(recipe_path())]
    cmd = cmd + job.argv
    if dry_run:
        return {"job": job.name, "cmd": cmd, "rc": None}
    job.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(job.out / "run.log", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=_child_env()).returncode
    wall = time.time() - t0
    res = {"job": job.name, "rc": rc, "wall_seconds": wall, "cmd": cmd}
    if rc == 0:
        prev = json.loads((job.out / "study_done.json").read_text()) if is_done(job.out) else {}
        res["wall_seconds"] = wall + prev.get("wall_seconds", 0.0)
        (job.out / "study_done.json").write_text(json.dumps(dict(res, status="done", max_steps=max_steps), indent=1))
    elif rc == 1 and job.variant != "sft" and "stopped at RL step" in _tail(job.out / "run.log"):
        # the recipe's non-finite stop: a finished (stopped) run, counted as collapsed, not redone
        res["status"] = "stopped"
        (job.out / "study_done.json").write_text(json.dumps(dict(res, status="stopped", max_steps=max_steps), indent=1))
    return res


# --------------------------------------------------------------------------- child mode (early task plug-in)

def recipe_child(argv: List[str]) -> None:
    """Run the recipe in this process with the ``early`` dataset plugged in (source and reward)."""
    if str(code_root()) != sys.path[0]:
        sys.path.insert(0, str(code_root()))  # a --code-snapshot's creditlib first
    spec = importlib.util.spec_from_file_location("grpo_lambda_qwen_recipe", recipe_path())
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    from creditlib.rl.data import SyntheticSource
    from creditlib.rl.study_tasks import EarlyDecisionTask, early_decision_reward

    orig_source, orig_reward = mod.build_source, mod.reward_for_dataset
    filler = int(os.environ.get("STUDY_EARLY_FILLER", EARLY_FILLER))

    def build_source(cfg, tokenizer):
        if cfg.dataset == "early":
            return SyntheticSource(EarlyDecisionTask(cfg.num_ops, filler, cfg.data_seed,
                                                     {"test": cfg.eval_size, "val": 256}), tokenizer)
        return orig_source(cfg, tokenizer)

    def reward_for_dataset(dataset):
        return early_decision_reward if dataset == "early" else orig_reward(dataset)

    mod.build_source, mod.reward_for_dataset = build_source, reward_for_dataset
    mod.main(argv, prog="grpo_lambda_qwen.py (learning-study child)")


# --------------------------------------------------------------------------- analysis

def analyze(out: Path, tasks: Sequence[str], variants: Sequence[str], seeds: Sequence[int], max_steps: int,
            acc_th: Optional[List[float]], rew_th: Optional[List[float]], window: int, img_dir: Path,
            n_boot: int, collapse_margin: float) -> str:
    """Tables (Markdown, returned and written to ``<out>/results.md``), ``summary.json`` and PNGs."""
    from creditlib.rl import study as S

    img_dir.mkdir(parents=True, exist_ok=True)
    md: List[str] = []
    js: dict = {}
    for task in tasks:
        groups: Dict[str, list] = {}
        missing: List[str] = []
        for v in variants:
            for s in seeds:
                d = out / task / v / f"seed{s}"
                if not is_done(d, max_steps):
                    missing.append(f"{v}/seed{s}")
                    continue
                st = json.loads((d / "study_done.json").read_text())
                c = S.truncate(S.load_run(d, max_steps=st.get("max_steps", max_steps), label=v, seed=s,
                                          status="done" if st["status"] == "done" else "stopped"), max_steps)
                groups.setdefault(v, []).append(c)
        md.append(f"### Task `{task}`: {TASKS[task]['desc']}\n")
        if not groups:
            md.append("not run\n")
            continue
        ath = acc_th if acc_th is not None else list(TASKS[task]["acc"])
        rth = rew_th if rew_th is not None else list(TASKS[task]["reward"])
        sums = {v: S.summarize(cs, ath, rth, window=window, collapse_margin=collapse_margin, n_boot=n_boot)
                for v, cs in groups.items()}
        keys = [("accuracy", t) for t in ath] + [("reward", t) for t in rth]
        ratios = {k: S.compare(sums, BASELINE, k, n_boot=n_boot) for k in keys} if BASELINE in sums else {}
        start = next(iter(groups.values()))[0].accuracy[0]
        md.append(f"Shared SFT start: held-out greedy accuracy {start:.3f}. Runs: "
                  + ", ".join(f"{v} {len(cs)}" for v, cs in groups.items()) + ".\n")
        # table 1: outcomes
        rows = []
        for v, s in sums.items():
            rows.append([v, s["n"], S.fmt_ci(s["final_accuracy"], 3), S.fmt_ci(s["auc"], 3),
                         S.fmt_ci(s["final_reward_ma"], 3), f"{s['collapse']}/{s['n']}",
                         f"{s['max_grad_norm']:.2f}" if math.isfinite(s["max_grad_norm"]) else "n/a"])
        md.append(S.markdown_table(["variant", "seeds", "final held-out acc", "AUC (mean acc)",
                                    f"final reward MA{window}", "collapsed", "max grad norm"], rows) + "\n")
        # table 2: steps / seconds to thresholds and ratio to GRPO
        rows = []
        for k in keys:
            kind, t = k
            label = f"held-out acc >= {t:g}" if kind == "accuracy" else f"reward MA{window} >= {t:g}"
            for v, s in sums.items():
                e = s[k]
                lb = e["reached"] < s["n"]
                r = ratios.get(k, {}).get(v)
                cens = lb or (BASELINE in sums and sums[BASELINE][k]["reached"] < sums[BASELINE]["n"])
                ratio = "n/a" if r is None else "1 (baseline)" if v == BASELINE else \
                    S.fmt_ci(r, 2) + (" (censored)" if cens else "")
                rows.append([label, v, f"{e['reached']}/{s['n']}", S.fmt_ci(e["steps"], 1, lb),
                             S.fmt_ci(e["seconds"], 1, lb), ratio])
        md.append(S.markdown_table(["threshold", "variant", "reached", "steps (mean [95% CI])",
                                    "train seconds", f"steps ratio / {BASELINE} [95% CI]"], rows) + "\n")
        md.append("Steps and seconds: means over seeds with 95% percentile-bootstrap intervals; `>=` marks a lower "
                  "bound (a seed that never reached the threshold counts at its last step); a ratio marked "
                  "(censored) involves such seeds. Train seconds = sum of the recipe's per-step times (rollout, "
                  "reward, update; evaluation excluded).\n")
        if missing:
            md.append("Not run (or unfinished): " + ", ".join(missing) + "\n")
        # figures
        S.plot_curves(groups, img_dir / f"study_{task}_accuracy.png", "accuracy", window,
                      f"{task}: held-out greedy accuracy (mean; band = seed min..max)", ath)
        S.plot_curves(groups, img_dir / f"study_{task}_reward.png", "reward", window,
                      f"{task}: train reward, {window}-step moving average (mean; band = seed min..max)", rth)
        S.plot_threshold_bars(sums, keys, img_dir / f"study_{task}_steps.png",
                              f"{task}: RL steps to threshold (95% bootstrap CI; hatched = lower bound)")
        js[task] = {v: {("/".join(map(str, k)) if isinstance(k, tuple) else k): val for k, val in s.items()}
                    for v, s in sums.items()}
        js[task]["_ratios"] = {"/".join(map(str, k)): r for k, r in ratios.items()}
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(js, indent=1, default=str))
    return text


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="learning_study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="default",
                   help=f"comma list of tasks or 'all' ({', '.join(TASKS)}); default: default")
    p.add_argument("--variants", default="main",
                   help=f"comma list of variants, 'main' ({', '.join(MAIN_VARIANTS)}) or 'all' ({', '.join(VARIANTS)}); "
                        f"default: main. GRPO = grpo (lam 0, no clamp); GRPO-lambda = trace_clamp")
    p.add_argument("--seeds", default="5", help="a count ('5' = seeds 0..4), a range ('0-4') or a list ('0,3'); default: 5")
    p.add_argument("--max-steps", type=int, default=150, help="RL steps per run (default: 150)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each (default: 2)")
    p.add_argument("--out", default="runs/study", help="output root (default: runs/study)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default: <out>/img)")
    p.add_argument("--sft-seed", type=int, default=0, help="seed of the shared warm-up run of every task (default: 0)")
    p.add_argument("--recipe-args", default="",
                   help="extra recipe flags for every run, one string (e.g. \"--lr 2e-4 --group-size 16\"); "
                        f"they override the study defaults {STUDY_DEFAULTS} (see recipes/grpo_lambda_qwen.py --help)")
    p.add_argument("--acc-thresholds", default=None,
                   help="comma list of held-out accuracy thresholds (default: per task, see --list)")
    p.add_argument("--reward-thresholds", default=None,
                   help="comma list of training-reward moving-average thresholds (default: per task, see --list)")
    p.add_argument("--window", type=int, default=10, help="moving-average window of the training reward, steps (default: 10)")
    p.add_argument("--collapse-margin", type=float, default=0.05,
                   help="a run collapses when its last quarter of evaluations all sit this far below its start (default: 0.05)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--code-snapshot", default=None,
                   help="run every run with a copy of creditlib/ and the recipe made in this folder at the first call "
                        "(reused later), so edits to the working tree during a sweep cannot mix code versions")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds after which no new run starts (running ones finish; rerun later to continue); 0 = none")
    p.add_argument("--analyze-only", action="store_true", help="launch nothing; tabulate and plot the finished runs")
    p.add_argument("--no-analyze", action="store_true", help="run, but skip the tables and plots")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, launch nothing")
    p.add_argument("--list", action="store_true", help="print the tasks and variants and exit")
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
            print(f"task {n:8s} {t['desc']}; overrides {t['overrides']}; thresholds acc {t['acc']} reward MA {t['reward']}")
        for n, v in VARIANTS.items():
            print(f"variant {n:12s} {v}")
        print(f"study defaults (every run): {STUDY_DEFAULTS}")
        return 0
    try:
        tasks = parse_names(a.tasks, TASKS, "tasks")
        variants = parse_names(a.variants, VARIANTS, "variants", MAIN_VARIANTS)
        seeds = parse_seeds(a.seeds)
        acc_th = parse_floats(a.acc_thresholds, "acc-thresholds")
        rew_th = parse_floats(a.reward_thresholds, "reward-thresholds")
        if a.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {a.max_steps}")
        if a.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
        if a.window < 1:
            raise ValueError(f"--window must be >= 1, got {a.window}")
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    if not out.is_absolute():
        out = ROOT / out
    img_dir = Path(a.img_dir) if a.img_dir else out / "img"
    if a.code_snapshot and not a.analyze_only and not a.dry_run:
        snap = Path(a.code_snapshot)
        os.environ["STUDY_CODE_ROOT"] = str(make_snapshot(snap if snap.is_absolute() else ROOT / snap))
    extra = a.recipe_args.split()
    base = to_flags(dict(STUDY_DEFAULTS, progress=False, plot=False)) + extra

    if not a.analyze_only:
        t0 = time.time()
        early_native = "early" in tasks and recipe_supports("early")
        sft_jobs, rl_jobs = [], []
        for task in tasks:
            tover = to_flags(TASKS[task]["overrides"])
            child = task == "early" and not early_native
            sdir = out / task / "sft"
            if not is_done(sdir):
                if sdir.exists() and not a.dry_run:
                    shutil.rmtree(sdir)
                sft_jobs.append(Job(task, "sft", a.sft_seed, sdir, base + tover + to_flags(
                    {"max_steps": 0, "seed": a.sft_seed, "output_dir": str(sdir)}), child))
            for s in seeds:  # seed-major: a sweep cut short by --time-budget leaves every variant equally far
                for v in variants:
                    d = out / task / v / f"seed{s}"
                    if is_done(d, a.max_steps):
                        continue
                    rl_jobs.append(Job(task, v, s, d, base + tover + to_flags(dict(
                        VARIANTS[v], seed=s, max_steps=a.max_steps, output_dir=str(d), resume=True)), child))
        n_total = len(tasks) * len(variants) * len(seeds)
        print(f"learning study: {len(tasks)} task(s) x {len(variants)} variant(s) x {len(seeds)} seed(s) = {n_total} runs; "
              f"{n_total - len(rl_jobs)} already finished, {len(rl_jobs)} to run, {len(sft_jobs)} warm-up(s); "
              f"{a.jobs} in parallel -> {out}", flush=True)
        failed = []
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for r in pool.map(lambda j: run_job(j, 0, a.dry_run), sft_jobs):
                print(("DRY " + " ".join(r["cmd"])) if a.dry_run else
                      f"  [sft] {r['job']}: rc={r['rc']} {r['wall_seconds']:.0f} s", flush=True)
                if not a.dry_run and r["rc"] != 0:
                    failed.append(r["job"])
            ok_tasks = {t for t in tasks if a.dry_run or is_done(out / t / "sft")}
            todo = []
            for j in rl_jobs:
                if j.task not in ok_tasks:
                    continue
                if not a.dry_run and not (j.out / "checkpoints" / "latest").is_file():
                    prepare_from_sft(out / j.task / "sft", j.out)
                todo.append(j)
            deadline = t0 + a.time_budget if a.time_budget else None
            skipped: List[str] = []

            def guarded(j: Job) -> dict:
                if deadline is not None and time.time() > deadline:
                    skipped.append(j.name)
                    return {"job": j.name, "rc": None, "skipped": True, "wall_seconds": 0.0, "cmd": []}
                return run_job(j, a.max_steps, a.dry_run)

            futs = {pool.submit(guarded, j): j for j in todo}
            for i, f in enumerate(as_completed(futs), 1):
                r = f.result()
                if r.get("skipped"):
                    continue
                if a.dry_run:
                    print("DRY " + " ".join(r["cmd"]))
                    continue
                print(f"  [{i}/{len(todo)}] {r['job']}: rc={r['rc']} {r['wall_seconds']:.0f} s "
                      f"(elapsed {time.time() - t0:.0f} s)", flush=True)
                if r["rc"] != 0 and r.get("status") != "stopped":
                    failed.append(r["job"])
        if not a.dry_run and a.time_budget and skipped:
            print(f"--time-budget {a.time_budget:.0f} s reached: {len(skipped)} run(s) not started (rerun to continue): "
                  f"{', '.join(skipped)}", flush=True)
        if failed:
            print(f"failed (see their run.log; rerun to retry): {', '.join(failed)}", flush=True)
        print(f"sweep wall time: {time.time() - t0:.0f} s", flush=True)
        if a.dry_run:
            return 0
    if not a.no_analyze:
        text = analyze(out, tasks, variants, seeds, a.max_steps, acc_th, rew_th, a.window, img_dir, a.bootstrap,
                       a.collapse_margin)
        print(text)
        print(f"tables: {out / 'results.md'}; plots: {img_dir}/study_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
