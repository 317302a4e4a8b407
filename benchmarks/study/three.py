"""Study 3 (issue 20): do trees, the trace and prefix-tree credit learn faster per generated token on
tasks where credit assignment should be the bottleneck? Independent warm-ups, off-policy updates.

What differs from study 2 (:mod:`study.plan`, :mod:`study.sweep`):

* **independent runs**: every seed ``k`` (reported seeds 0.., selection seeds 1000..) gets its OWN
  warm-up (``--seed k``: its own initialisation, SFT data order and SFT sampling), and its RL runs
  start from it with the same seed (their own prompt order). Arms are paired by seed: all arms of seed
  ``k`` start from the same warm-up, so differences between arms are not differences of starts;
* **selection** of each arm's learning rate on 2 validation seeds (their own warm-ups) over the SAME
  number of RL steps as the reported runs, on the validation split;
* **evaluation every 5 steps**, greedy and one sampled completion per held-out prompt, and the
  generated tokens at each evaluation (the recipe's ``generated_tokens`` counter), so that progress can
  be read per step, per generated token and per second;
* **arms are data** (:data:`ARMS`: name -> recipe options), so a credit method, a tree rollout or an
  off-policy schedule joins with one line.

Run folders (``--out``, default ``runs/study3``)::

    <out>/<task>/warmup/seed<k>/                         the warm-up of seed k (recipe with --max-steps 0)
    <out>/<task>/select/<arm>/lr<LR>/seed<k>/            selection runs (validation split)
    <out>/<task>/lr_choice.json                          each arm's chosen rate, with every score
    <out>/<task>/final/<arm>/lr<LR>/seed<k>/             reported runs (test split)

The command line is ``benchmarks/study3.py``; the analysis is :mod:`study.report3`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from study.plan import Job, is_done, read_done, to_flags
from study.stats import choose_lr, load_run, lr_tag, selection_score, truncate
from study.sweep import Runner, _say, run_chains, start_flags

# --------------------------------------------------------------------------- arms and tasks (data)

#: the tree of the tree arms: 2 independent roots, one entropy fork each, 3 branches -> 2 * (1 + 3) = 8
#: leaves, the group size of every arm (equal leaves, fewer generated tokens than 8 flat completions)
TREE = {"tree_roots": 2, "tree_forks": 1, "tree_branches": 3, "tree_depth": 1, "tree_select": "entropy"}
#: the off-policy schedule: 2 PPO epochs x 2 minibatches of 32 = 4 optimizer steps per batch of 64 rows,
#: so from the second minibatch on the policy differs from the sampler and the clip can act
OFF_POLICY = {"ppo_epochs": 2, "minibatch_size": 32}

#: arm name -> recipe options (``credit`` and any other recipe option). One line per arm.
ARMS: Dict[str, dict] = {
    "grpo": {"credit": "grpo"},
    "grpo-lambda": {"credit": "grpo-lambda"},
    "prefix-gae": {"credit": "prefix-gae"},
    # Dr. GRPO's aggregation: the sum over a completion's tokens divided by a constant (the longest
    # completion the recipe allows), not by its length: the step-size control of the trace's gain
    "grpo-sum": {"credit": "grpo", "aggregation": "seq-mean-token-sum-norm"},
    "tree-prefix-gae": {"credit": "prefix-gae", **TREE},
    "tree-grpo": {"credit": "grpo", **TREE},
    "tree-prefix-gae-clamp": {"credit": "prefix-gae-clamp", **TREE},
    "tree-treerl": {"credit": "treerl", **TREE},
    "offpolicy-grpo": {"credit": "grpo", **OFF_POLICY},
    "offpolicy-gspo": {"credit": "gspo", **OFF_POLICY},
    # multi-turn (the dial walk): credit per turn from the episodes' turn rewards and state ids
    "turn-grpo": {"credit": "turn-grpo"},
    "turn-index": {"credit": "turn-index"},
    "anchor-state": {"credit": "anchor-state"},
    "prefix-turn": {"credit": "prefix-turn"},
}
BASELINE = "grpo"

#: distractor-4's arms: every arm but ``tree-grpo`` (cut for time on 2026-12-06: GRPO on tree rows is the
#: tree's control for credit, and ``tree-prefix-gae`` vs flat ``grpo`` already measures the tree + credit)
MAIN_ARMS = ("grpo", "grpo-lambda", "prefix-gae", "grpo-sum", "tree-prefix-gae", "offpolicy-grpo", "offpolicy-gspo")
TURN_ARMS = ("grpo", "turn-grpo", "turn-index", "anchor-state", "prefix-turn")
SHORT_ARMS = ("grpo", "grpo-lambda", "prefix-gae", "grpo-sum", "tree-prefix-gae")
#: multi-decision-count also runs the tree's other credit rules at equal leaves (added in a second invocation)
TREE_ARMS = ("tree-grpo", "tree-prefix-gae-clamp", "tree-treerl")

#: task name -> recipe options, description, arms, RL steps. Every task's warm-up: supervised steps until
#: the MEAN of the last 3 validation evaluations reaches 0.45 (``--sft-target-window 3``: a one-evaluation
#: spike cannot stop it), at most ``sft_steps``.
TASKS: Dict[str, dict] = {
    "distractor-4": {
        "overrides": {"dataset": "distractor-4", "num_ops": 10, "sft_steps": 800},
        "desc": "10-move dial walk written step by step, 4 free +/- tokens after every step that the reward "
                "ignores (53-token completions, 40 of them free and uncertain)",
        "arms": MAIN_ARMS, "steps": 50, "role": "main"},
    "multi-decision-count": {
        "overrides": {"dataset": "multi-decision-count", "num_ops": 8, "sft_steps": 800},
        "desc": "8-move walk; the completion gives the dial at 4 checkpoints (13 tokens), each in one token; the "
                "reward is the fraction right",
        "arms": SHORT_ARMS + TREE_ARMS, "steps": 50, "role": "main"},
    "distractor-0": {
        "overrides": {"dataset": "distractor-0", "num_ops": 10, "sft_steps": 800},
        "desc": "the same walk with no free tokens (13-token completions): GRPO's reference for the scan over F",
        "arms": ("grpo",), "steps": 50, "role": "scan"},
    "distractor-2": {
        "overrides": {"dataset": "distractor-2", "num_ops": 10, "sft_steps": 800},
        "desc": "the same walk with 2 free tokens after every step (33-token completions)",
        "arms": ("grpo",), "steps": 50, "role": "scan"},
    "dial-walk": {
        # the multi-turn dial walk (creditlib.rl.envs, with the study's split switch): a move per turn, the
        # environment restates target and position; 20 test / 10 validation (start, target) pairs. Its
        # warm-up is a fixed 40 steps (the validation pairs read 0.6-0.8 from step 5, so a target stop
        # fires at once); rates an order of magnitude above the single-turn tasks' (episodes are 2-14
        # policy tokens); 4 sampled episodes per held-out pair (there are only 20)
        "overrides": {"env": "dial-walk-study", "sft_steps": 40, "sft_target_accuracy": 0.0},
        "desc": "multi-turn dial walk: a move per turn, the environment answers with target and position; reward 1 "
                "when the dial reaches the target within the shortest distance + 2 moves; 20 held-out pairs",
        "arms": TURN_ARMS, "steps": 50, "role": "main", "lr_grid": (1e-4, 1e-3), "eval_samples": 4},
}
#: the free tokens per step of the scan's tasks (GRPO's learning against F)
SCAN_F = {"distractor-0": 0, "distractor-2": 2, "distractor-4": 4}

LR_GRID = (2e-5, 1e-4)
SEEDS = tuple(range(5))
SELECT_SEEDS = (1000, 1001)

#: options every run gets (before --recipe-args)
DEFAULTS = {"warmup_steps": 0, "prompts_per_step": 8, "group_size": 8, "temperature": 1.0, "clip_eps": 0.2,
            "aggregation": "token-mean", "max_grad_norm": 1.0, "ppo_epochs": 1, "eval_every": 5,
            "eval_size": 128, "sft_eval_every": 25, "sft_target_accuracy": 0.45, "sft_target_window": 3,
            "save_every": 50, "keep_checkpoints": 1, "num_threads": 1, "progress": False, "plot": False}

#: cost model of ``--plan``: seconds of one RL step, one evaluation (greedy + sampled), start-up and
#: the warm-up, measured on the 2-core AMD EPYC (Zen 4) 2026-12-06 with 2 runs in parallel
COST = {"dial-walk": {"step": 0.3, "eval": 1.0, "start": 8.0, "warmup": 20.0},
        "distractor-4": {"step": 0.65, "eval": 3.0, "start": 8.0, "warmup": 110.0},
        "multi-decision-count": {"step": 0.13, "eval": 1.0, "start": 8.0, "warmup": 60.0},
        "distractor-0": {"step": 0.13, "eval": 1.0, "start": 8.0, "warmup": 40.0},
        "distractor-2": {"step": 0.40, "eval": 2.0, "start": 8.0, "warmup": 80.0}}
#: arm cost multipliers of one RL step (more optimizer steps; a tree samples fewer tokens)
ARM_COST = {"offpolicy-grpo": 1.4, "offpolicy-gspo": 1.4, "tree-prefix-gae": 0.9, "tree-grpo": 0.9}


@dataclass
class Plan3:
    tasks: List[str]
    arms: Dict[str, List[str]]
    seeds: List[int]
    select_seeds: List[int]
    grid: List[float]
    steps: Dict[str, int]
    eval_samples: int = 1
    jobs: int = 2
    explicit_grid: bool = False  # --lr-grid given: it replaces every task's own grid
    explicit_samples: bool = False  # --eval-samples given: it replaces every task's own

    def grid_of(self, task: str) -> List[float]:
        """The task's learning-rate grid: ``--lr-grid`` when given, else the task's own (``lr_grid``) or the default."""
        return list(self.grid) if self.explicit_grid else sorted(TASKS[task].get("lr_grid", self.grid))

    def samples_of(self, task: str) -> int:
        return self.eval_samples if self.explicit_samples else TASKS[task].get("eval_samples", self.eval_samples)

    @property
    def selecting(self) -> bool:
        return len(self.grid) > 1

    def run_seconds(self, task: str, arm: str) -> float:
        c, every = COST[task], DEFAULTS["eval_every"]
        n_eval = self.steps[task] // every + 1
        return c["start"] + self.steps[task] * c["step"] * ARM_COST.get(arm, 1.0) + n_eval * c["eval"]

    def describe(self) -> str:
        lines = [f"study 3 plan: {len(self.tasks)} task(s); reported seeds {self.seeds} and selection seeds "
                 f"{self.select_seeds if self.selecting else '(none: one rate)'}, each with its own warm-up; evaluation "
                 f"every {DEFAULTS['eval_every']} steps on {DEFAULTS['eval_size']} held-out prompts (fewer where the "
                 f"task has fewer), greedy + sampled; {self.jobs} run(s) in parallel, one thread each"]
        total = 0.0
        for t in self.tasks:
            arms = self.arms[t]
            n_w = len(self.seeds) + (len(self.select_seeds) if self.selecting else 0)
            sel = sum(self.run_seconds(t, a) for a in arms) * len(self.grid_of(t)) * len(self.select_seeds) \
                if self.selecting else 0.0
            fin = sum(self.run_seconds(t, a) for a in arms) * len(self.seeds)
            warm = n_w * COST[t]["warmup"]
            total += sel + fin + warm
            lines.append(f"  {t:22s} {len(arms)} arm(s), {self.steps[t]} RL steps: {n_w} warm-ups ({warm / 60:.1f} "
                         f"core-min), {len(arms) * len(self.grid_of(t)) * len(self.select_seeds) if self.selecting else 0} "
                         f"selection runs ({sel / 60:.1f}), {len(arms) * len(self.seeds)} reported runs "
                         f"({fin / 60:.1f})")
            lines.append(f"  {'':22s} arms: {', '.join(arms)}; lr grid {', '.join(f'{x:g}' for x in self.grid_of(t))}; "
                         f"{self.samples_of(t)} sample(s) per held-out prompt")
        lines.append(f"estimated wall time: {total / self.jobs / 60:.0f} min with {self.jobs} parallel runs (cost model "
                     "measured at load about 2 on 2 cores; see study.three.COST)")
        return "\n".join(lines)


def default_plan(jobs: int = 2) -> Plan3:
    return Plan3(list(TASKS), {t: list(TASKS[t]["arms"]) for t in TASKS}, list(SEEDS), list(SELECT_SEEDS),
                 list(LR_GRID), {t: TASKS[t]["steps"] for t in TASKS}, 1, jobs)


# --------------------------------------------------------------------------- folders and jobs

def warmup_dir(out: Path, task: str, seed: int) -> Path:
    return out / task / "warmup" / f"seed{seed}"


def run_dir(out: Path, task: str, phase: str, arm: str, lr: float, seed: int) -> Path:
    return out / task / phase / arm / lr_tag(lr) / f"seed{seed}"


def warmup_job(out: Path, task: str, seed: int, extra: Sequence[str]) -> Job:
    d = warmup_dir(out, task, seed)
    opts = dict(DEFAULTS, **TASKS[task]["overrides"], max_steps=0, seed=seed, output_dir=str(d), eval_samples=1)
    return Job(task, "warmup", seed, d, to_flags(opts) + list(extra), "sft")


def rl_job(out: Path, plan: Plan3, task: str, arm: str, lr: float, seed: int, phase: str, extra: Sequence[str],
           dry_run: bool) -> Job:
    d = run_dir(out, task, phase, arm, lr, seed)
    opts = dict(DEFAULTS, **TASKS[task]["overrides"], **ARMS[arm], lr=lr, seed=seed, max_steps=plan.steps[task],
                output_dir=str(d), eval_samples=plan.samples_of(task))
    w = warmup_dir(out, task, seed)
    start = ["--init-from", str(w / "checkpoints" / "step_000000")] if dry_run else start_flags(d, w)
    return Job(task, arm, seed, d, to_flags(opts) + list(extra) + start, "select" if phase == "select" else "final",
               lr, plan.steps[task], {"STUDY_EVAL_SPLIT": "val"} if phase == "select" else {})


def selection_state(out: Path, plan: Plan3, task: str, arm: str) -> dict:
    """The rates of ``arm`` still to run on ``task`` (``todo``), or the chosen one (``lr``) with every score.

    Score: the mean over selection seeds of the AUC of VALIDATION greedy accuracy over the run's steps."""
    if not plan.selecting:
        return {"lr": plan.grid_of(task)[0], "scores": {}, "todo": []}
    scores: Dict[float, List[float]] = {}
    todo = []
    for lr in plan.grid_of(task):
        for s in plan.select_seeds:
            d = run_dir(out, task, "select", arm, lr, s)
            if not is_done(d, plan.steps[task]):
                todo.append(lr)
                continue
            c = truncate(load_run(d, plan.steps[task], status=read_done(d)["status"]), plan.steps[task])
            scores.setdefault(lr, []).append(selection_score(c, plan.steps[task]))
    if todo:
        return {"lr": None, "scores": scores, "todo": sorted(set(todo))}
    best, edge = choose_lr(scores)
    return {"lr": best, "edge": edge, "scores": scores, "todo": []}


def task_chain(out: Path, plan: Plan3, task: str, runner: Runner, extra: Sequence[str], dry_run: bool) -> None:
    """One task: the warm-ups (selection seeds first), the selection runs, then the reported runs at each
    arm's chosen rate (seed-major, so a sweep cut short leaves every arm equally far)."""
    seeds = (plan.select_seeds if plan.selecting else []) + plan.seeds
    todo = []
    for s in seeds:
        w = warmup_dir(out, task, s)
        if not is_done(w):
            if w.exists() and not dry_run:
                shutil.rmtree(w)  # an interrupted warm-up restarts from scratch (its folder is the study's own)
            todo.append(warmup_job(out, task, s, extra))
    runner.run(todo, f"{task}: warm-ups (one per seed)")
    if not dry_run and not all(is_done(warmup_dir(out, task, s)) for s in seeds):
        _say(f"{task}: a warm-up failed; see its run.log")
        return
    arms = plan.arms[task]
    sel = [rl_job(out, plan, task, a, lr, s, "select", extra, dry_run)
           for s in plan.select_seeds for a in arms for lr in selection_state(out, plan, task, a)["todo"]
           if not is_done(run_dir(out, task, "select", a, lr, s), plan.steps[task])] if plan.selecting else []
    runner.run(sel, f"{task}: lr selection (validation split)")
    states = {a: selection_state(out, plan, task, a) for a in arms}
    if not dry_run:
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / "lr_choice.json").write_text(json.dumps({
            "statistic": f"mean over selection seeds {plan.select_seeds} (each with its own warm-up) of the AUC of "
                         f"held-out VALIDATION greedy accuracy over RL steps 0..{plan.steps[task]}",
            "grid": plan.grid_of(task),
            "arms": {a: {"lr": st["lr"], "edge": st.get("edge"),
                         "scores": {lr_tag(lr): v for lr, v in sorted(st["scores"].items())}}
                     for a, st in states.items()}}, indent=1))
    final = [rl_job(out, plan, task, a, states[a]["lr"], s, "final", extra, dry_run)
             for s in plan.seeds for a in arms
             if states[a]["lr"] is not None
             and not is_done(run_dir(out, task, "final", a, states[a]["lr"], s), plan.steps[task])]
    runner.run(final, f"{task}: reported runs (test split)")


def sweep3(out: Path, plan: Plan3, jobs: int, extra: Sequence[str], dry_run: bool, time_budget: float) -> int:
    """Every task's chain, concurrently, on ``jobs`` shared slots (the cheapest task first: its warm-ups are
    short and its runs finish early; the costly task's runs queue behind them)."""
    order = sorted(plan.tasks, key=lambda t: COST[t]["step"])
    return run_chains(order, lambda t, runner: task_chain(out, plan, t, runner, extra, dry_run), jobs, dry_run,
                      time_budget)


def chosen_lr(out: Path, task: str, arm: str) -> Optional[float]:
    f = out / task / "lr_choice.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())["arms"].get(arm, {}).get("lr")


def parse_list(spec: str, registry: Sequence[str], what: str) -> List[str]:
    if spec == "all":
        return list(registry)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in registry]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--{what} must be 'all' or a comma list of distinct names from {list(registry)}, got {spec!r}")
    return names


def make_plan3(tasks: str, arms: str, seeds: str, select_seeds: int, lr_grid: Optional[str], max_steps: Optional[int],
               eval_samples: Optional[int], jobs: int) -> Plan3:
    """The plan of a command line. ``lr_grid`` / ``eval_samples`` None: each task's own (else the defaults)."""
    from study.plan import parse_floats, parse_seeds

    ts = parse_list(tasks, list(TASKS), "tasks")
    sd = parse_seeds(seeds)
    if max(sd) >= SELECT_SEEDS[0]:
        raise ValueError(f"--seeds must stay below {SELECT_SEEDS[0]} (the selection seeds), got {seeds!r}")
    if select_seeds < 1:
        raise ValueError(f"--select-seeds must be >= 1, got {select_seeds}")
    grid = sorted(parse_floats(lr_grid, "lr-grid", positive=True)) if lr_grid is not None else list(LR_GRID)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if eval_samples is not None and eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0, got {eval_samples}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    per = {t: list(TASKS[t]["arms"]) if arms == "task" else [a for a in parse_list(arms, list(ARMS), "arms")] for t in ts}
    return Plan3(ts, per, sd, list(range(SELECT_SEEDS[0], SELECT_SEEDS[0] + select_seeds)), grid,
                 {t: max_steps or TASKS[t]["steps"] for t in ts}, 1 if eval_samples is None else eval_samples, jobs,
                 explicit_grid=lr_grid is not None, explicit_samples=eval_samples is not None)


def recipe_flags(task: str, arm: str, lr: float, seed: int) -> Tuple[List[str], List[str]]:
    """The warm-up's and an RL run's recipe flags (for docs and tests)."""
    p = Plan3([task], {task: [arm]}, [seed], [], [lr], {task: TASKS[task]["steps"]}, explicit_grid=True)
    w = warmup_job(Path("runs/study3"), task, seed, [])
    r = rl_job(Path("runs/study3"), p, task, arm, lr, seed, "final", [], dry_run=True)
    return w.argv, r.argv


# --------------------------------------------------------------------------- shipping the results

#: what --analyze-only reads from a run folder (the rest: checkpoints, samples, logs, stays out)
RUN_FILES = ("metrics.jsonl", "study_done.json")


def pack(out: Path, plan: Plan3, dest: Path) -> List[Path]:
    """``dest/study3-runs.tar.xz``: every run's :data:`RUN_FILES` (warm-ups, selection, reported runs), each
    task's ``lr_choice.json``, ``<out>/sweeps.jsonl`` and the warm-ups' entropy profiles (``<out>/entropy/``),
    under ``study3/``; ``dest/study3-warmups.tar.xz``:
    the warm-up checkpoints (the folder ``--init-from`` reads) of the reported seeds of the main
    tasks, so that anyone can start RL from the same weights on any machine (``--init-from``)."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    runs, warm = dest / "study3-runs.tar.xz", dest / "study3-warmups.tar.xz"
    with tarfile.open(runs, "w:xz") as tar:
        for t in plan.tasks:
            for f in sorted((out / t).rglob("*")):
                if f.name in RUN_FILES + ("lr_choice.json",) and "checkpoints" not in f.parts:
                    tar.add(f, arcname=str(Path("study3") / f.relative_to(out)))
        for f in [out / "sweeps.jsonl"] + sorted((out / "entropy").glob("*.json")):
            if f.is_file():
                tar.add(f, arcname=str(Path("study3") / f.relative_to(out)))
    with tarfile.open(warm, "w:xz") as tar:
        for t in plan.tasks:
            if TASKS[t]["role"] != "main":
                continue
            for s in plan.seeds:
                ck = warmup_dir(out, t, s) / "checkpoints" / "step_000000"
                for f in sorted(ck.iterdir()):  # what --init-from reads: weights, optimizer, rng, trainer state
                    tar.add(f, arcname=str(Path("study3") / f.relative_to(out)))
    return [runs, warm]
