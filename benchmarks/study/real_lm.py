#!/usr/bin/env python
"""GRPO vs GRPO-lambda vs tree-prefix-gae on a real-text task with a real language model.

    .venv/bin/python benchmarks/study/real_lm.py --plan                 # sizes and estimated wall time only
    nice -n 5 .venv/bin/python benchmarks/study/real_lm.py              # CPU smoke: SmolLM2-135M-Instruct
    python3 benchmarks/study/real_lm.py --preset gpu --model DIR        # GPU (or benchmarks/study/real_lm_gpu.sh)
    python3 benchmarks/study/real_lm.py --init-from-config qwen2.5-0.5b --model DIR   # a random-weight Qwen2.5 folder

What it does:

1. writes a real-text arithmetic training set (``What is 17 + 25?``, GSM8K format,
   :func:`creditlib.eval.arithmetic.arithmetic_rows`) and a held-out set from another seed, with no
   question in both (checked; a held-out question that the training set also holds is dropped and
   replaced by the next one of its seed), to ``--out``;
2. runs the unmodified recipe ``recipes/grpo.py`` once per arm (:data:`ARMS`: a name and its recipe
   flags) in a subprocess, every arm from the same ``--model`` folder with the same seed, prompts,
   learning rate, sampling and held-out set (``--eval-dataset``), ``--sft-steps 0`` and the chat
   template, each in its own run folder ``--out/<arm>``;
3. reads each run's ``metrics.jsonl`` and writes ``summary.json`` and ``results.md`` to ``--out``:
   held-out greedy and sampled accuracy before and after RL, RL steps, generated tokens, reward,
   seconds per RL step and wall seconds.

It is resumable: an arm whose run finished (``final/`` written, last evaluation at ``--steps``) is
skipped, an interrupted one is continued with the recipe's ``--resume``; a run folder holding a
run made with other flags is refused, never deleted.

At the CPU preset's size (a few RL steps of 16 completions) this is a smoke-scale check that the
three methods run end to end on a real tokenizer, chat template and pretrained weights, with the
numbers they log; it is not a result: differences between arms at this size are noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from creditlib.eval.arithmetic import arithmetic_rows  # noqa: E402

RECIPE = ROOT / "recipes" / "grpo.py"

#: the compared arms: name -> recipe flags. ``{tree_roots}`` is filled by :func:`arm_flags` so that the
#: tree's leaves (roots * (1 + forks * branches) at depth 1) equal --group-size.
ARMS: Dict[str, List[str]] = {
    "grpo": ["--credit", "grpo"],
    "grpo-lambda": ["--credit", "grpo-lambda"],
    "tree-prefix-gae": ["--credit", "prefix-gae", "--tree-roots", "{tree_roots}", "--tree-forks", "1",
                        "--tree-branches", "3", "--tree-depth", "1"],
}

#: run sizes; explicit command-line flags override them. ``model`` None = materialise SmolLM2.
PRESETS: Dict[str, Dict[str, object]] = {
    "cpu": dict(model=None, device="cpu", prompts_per_step=4, group_size=4, max_new_tokens=48, steps=8,
                heldout=32, eval_samples=1, train_size=256, lr=1e-5, temperature=0.7, dtype="float32",
                ops="+-", max_operand=20, sec_per_token=0.042, sec_per_eval_token=0.02),
    "gpu": dict(model=None, device="cuda", prompts_per_step=16, group_size=8, max_new_tokens=256, steps=40,
                heldout=256, eval_samples=4, train_size=4096, lr=1e-6, temperature=0.7, dtype="auto",
                ops="+-*", max_operand=99, sec_per_token=0.0004, sec_per_eval_token=0.0002),
}

#: Qwen2 shapes for --init-from-config (the vocabulary follows the tokenizer given).
SHAPES: Dict[str, Dict[str, int]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
}

TRAIN_SEED, HELDOUT_SEED = 0, 1


# ---------------------------------------------------------------------------- data
def make_sets(train_size: int, heldout_size: int, train_seed: int = TRAIN_SEED,
              heldout_seed: int = HELDOUT_SEED, ops: str = "+-*", max_operand: int = 99) -> tuple:
    """The training rows (``arithmetic_rows(train_size, train_seed)``) and ``heldout_size`` held-out rows
    of ``heldout_seed`` whose questions the training set does not hold (a held-out question that is
    also a training one is skipped for the next index of its seed). Raises ``ValueError`` if the two
    sets still share a question, or on a bad size or equal seeds."""
    for name, v in (("train_size", train_size), ("heldout_size", heldout_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if train_seed == heldout_seed:
        raise ValueError(f"train_seed and heldout_seed must differ, got {train_seed} for both")
    train = arithmetic_rows(train_size, train_seed, ops=ops, max_operand=max_operand)
    seen = {r["question"] for r in train}
    held, n = [], heldout_size
    while len(held) < heldout_size:
        pool = arithmetic_rows(n, heldout_seed, ops=ops, max_operand=max_operand)  # a pure function of (seed, index): a prefix of the larger pool
        held = []
        for r in pool:
            if r["question"] not in seen and r["question"] not in {h["question"] for h in held}:
                held.append(r)
            if len(held) == heldout_size:
                break
        n *= 2
        if n > 64 * heldout_size + 1024:
            raise ValueError(f"could not draw {heldout_size} held-out questions outside the {train_size} training ones")
    check_disjoint(train, held)
    return train, held


def check_disjoint(train: List[dict], held: List[dict]) -> None:
    """``ValueError`` naming the shared questions when a held-out question is also a training one."""
    both = sorted({r["question"] for r in train} & {r["question"] for r in held})
    if both:
        raise ValueError(f"training and held-out sets share {len(both)} question(s), e.g. {both[:3]}")


def write_rows(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


# ---------------------------------------------------------------------------- arms
def tree_roots_for(group_size: int, forks: int = 1, branches: int = 3, depth: int = 1) -> int:
    """Roots M so that the tree's leaves, M * sum_{d=0..D} (forks * branches)^d, equal ``group_size``."""
    per_root = sum((forks * branches) ** d for d in range(depth + 1))
    if group_size % per_root:
        raise ValueError(f"group_size must be a multiple of {per_root} for the tree arm (forks {forks}, branches "
                         f"{branches}, depth {depth}: {per_root} leaves per root), got {group_size}")
    return group_size // per_root


def arm_flags(arm: str, group_size: int, arms: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """The recipe flags of ``arm`` with ``{tree_roots}`` filled in for ``group_size``."""
    arms = ARMS if arms is None else arms
    if arm not in arms:
        raise ValueError(f"arm must be one of {sorted(arms)}, got {arm!r}")
    flags = list(arms[arm])
    if any("{tree_roots}" in f for f in flags):
        def _get(name, default):
            return int(flags[flags.index(name) + 1]) if name in flags else default
        roots = tree_roots_for(group_size, _get("--tree-forks", 1), _get("--tree-branches", 3), _get("--tree-depth", 1))
        flags = [f.replace("{tree_roots}", str(roots)) for f in flags]
    return flags


def common_flags(a: argparse.Namespace, train: Path, held: Path) -> List[str]:
    """The recipe flags every arm shares (model, data, sizes, seed, learning rate, evaluation)."""
    flags = ["--model", str(a.model), "--dataset", str(train), "--eval-dataset", str(held),
             "--eval-size", str(a.heldout), "--eval-samples", str(a.eval_samples), "--max-new-tokens",
             str(a.max_new_tokens), "--prompts-per-step", str(a.prompts_per_step), "--group-size", str(a.group_size),
             "--max-steps", str(a.steps), "--eval-every", str(a.steps), "--save-every", str(a.steps),
             "--keep-checkpoints", "1", "--sft-steps", "0", "--chat-template", "on", "--lr", str(a.lr),
             "--warmup-steps", "0", "--temperature", str(a.temperature), "--seed", str(a.seed), "--device", a.device,
             "--dtype", a.dtype, "--instruction", a.instruction, "--num-threads", str(a.num_threads), "--no-progress", "--no-plot", "--log-samples", "2"]
    return flags


def recipe_command(a: argparse.Namespace, arm: str, train: Path, held: Path, run_dir: Path,
                   resume: bool = False) -> List[str]:
    cmd = [sys.executable, str(RECIPE), *common_flags(a, train, held), *arm_flags(arm, a.group_size),
           "--output-dir", str(run_dir)]
    return cmd + (["--resume"] if resume else [])


# ---------------------------------------------------------------------------- run state
def read_metrics(path: Path) -> List[dict]:
    """The records of a metrics.jsonl; the last record per (phase, step) wins (a resumed run repeats some)."""
    if not path.is_file():
        return []
    last: Dict[tuple, dict] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
        last[(r.get("phase"), r.get("step"))] = r
    return sorted(last.values(), key=lambda r: (r.get("step") or 0, str(r.get("phase"))))


def finished(run_dir: Path, steps: int) -> bool:
    """The recipe finished ``steps`` RL steps here: ``final/`` exists and an evaluation at ``steps`` is logged."""
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("phase") == "eval"]
    return (run_dir / "final" / "config.json").is_file() and any(r.get("step") == steps for r in evals)


def arm_state(run_dir: Path) -> dict:
    p = run_dir / "study_arm.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def collect(run_dir: Path) -> dict:
    """Per-arm numbers from the run's metrics.jsonl (before = the step-0 evaluation, after = the last)."""
    recs = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in recs if r.get("phase") == "eval"]
    rl = [r for r in recs if r.get("phase") == "rl"]
    if not evals or not rl:
        raise ValueError(f"{run_dir}: metrics.jsonl holds {len(evals)} evaluations and {len(rl)} RL steps; "
                         "expected at least one of each")
    before, after = evals[0], evals[-1]
    st = arm_state(run_dir)
    return {
        "greedy_before": before.get("accuracy"), "greedy_after": after.get("accuracy"),
        "sampled_before": before.get("sampled_accuracy"), "sampled_after": after.get("sampled_accuracy"),
        "rl_steps": rl[-1]["step"], "generated_tokens": rl[-1].get("generated_tokens_total",
                                                                   sum(r.get("generated_tokens", 0.0) for r in rl)),
        "train_reward_mean": sum(r["reward"] for r in rl) / len(rl),
        "seconds_per_step": sum(r["step_seconds"] for r in rl) / len(rl),
        "wall_seconds": st.get("wall_seconds"), "flags": st.get("flags"), "run_dir": str(run_dir),
    }


# ---------------------------------------------------------------------------- machine and sizes
def machine(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return f"GPU {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - describe what we can
            pass
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores"


def estimate_seconds(a: argparse.Namespace) -> float:
    """Rough wall time of all arms: generated tokens x the preset's seconds per token (rollouts + update),
    held-out evaluation (greedy + sampled, before and after) x its seconds per token, plus model loading."""
    rl = a.steps * a.prompts_per_step * a.group_size * a.max_new_tokens * a.sec_per_token
    ev = 2 * a.heldout * (1 + a.eval_samples) * a.max_new_tokens * a.sec_per_eval_token
    return len(a.arms) * (rl + ev + 20.0)


def sizes(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ("model", "device", "dtype", "prompts_per_step", "group_size", "max_new_tokens",
                                       "steps", "heldout", "eval_samples", "train_size", "ops", "max_operand",
                                       "instruction", "lr", "temperature", "seed")}


# ---------------------------------------------------------------------------- --init-from-config
def init_from_config(shape: str, dest: str, tokenizer: str, seed: int = 0, dtype: str = "bfloat16") -> str:
    """Write a random-init Qwen2 model of ``shape`` (:data:`SHAPES`) with ``tokenizer``'s files to ``dest``.

    The vocabulary is the tokenizer's (so generated ids always decode); every other dimension is the
    named model's. Random weights answer nothing correctly: such a folder checks the code path and the
    step time, never accuracy."""
    if shape not in SHAPES:
        raise ValueError(f"init_from_config: shape must be one of {sorted(SHAPES)}, got {shape!r}")
    out = Path(dest)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--model {dest}: folder exists and is not empty; --init-from-config writes a new folder")
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"--tokenizer {tokenizer}: the tokenizer has no EOS token")
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"--tokenizer {tokenizer}: the tokenizer has no chat template (the study uses it)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=32768, rope_theta=1_000_000.0,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                      bos_token_id=tok.bos_token_id, **SHAPES[shape])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "creditlib-random-init.json").write_text(json.dumps({"shape": shape, "tokenizer": str(tokenizer),
                                                                "seed": seed, "weights": "random"}) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.replace(out)
    return str(out)


def default_model() -> str:
    """SmolLM2-135M-Instruct's folder (:func:`creditlib.rl.pretrained.materialize`; converted once, then reused)."""
    from creditlib.rl.pretrained import materialize

    return materialize("smollm2")


# ---------------------------------------------------------------------------- report
def fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def results_md(summary: dict) -> str:
    s = summary["sizes"]
    lines = [
        f"# Smoke-scale check, not a result: GRPO vs GRPO-lambda vs tree-prefix-gae on real-text arithmetic",
        "",
        f"{s['steps']} RL steps of {s['prompts_per_step']} prompts x {s['group_size']} completions "
        f"(<= {s['max_new_tokens']} new tokens) per arm, {s['heldout']} held-out questions "
        f"(greedy, and {s['eval_samples']} sample(s) each at T={s['temperature']}), lr {s['lr']:g}, seed {s['seed']}, "
        f"no warm-up. At this size the arms' differences are noise: this checks that the three methods run end to "
        f"end on a real model, tokenizer and chat template, and what they cost.",
        "",
        f"- model: `{s['model']}`{' (random weights: accuracy is meaningless)' if summary.get('random_weights') else ''}",
        f"- machine: {summary['machine']}; load average at start {summary['load_start']}, at end {summary['load_end']}",
        f"- train set: {s['train_size']} questions (seed {TRAIN_SEED}); held-out: {s['heldout']} others (seed "
        f"{HELDOUT_SEED}), disjoint (checked)",
        f"- command: `{summary['command']}`",
        f"- total wall time: {summary['wall_seconds']:.0f} s (the arms' recipe processes, summed over resumes)",
        "",
        "| arm | greedy acc before -> after | sampled acc before -> after | RL steps | generated tokens | "
        "train reward (mean) | s / RL step | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["arms"].items():
        lines.append(f"| {name} | {fmt(r['greedy_before'])} -> {fmt(r['greedy_after'])} | {fmt(r['sampled_before'])} "
                     f"-> {fmt(r['sampled_after'])} | {r['rl_steps']} | {r['generated_tokens']:,.0f} | "
                     f"{fmt(r['train_reward_mean'])} | {fmt(r['seconds_per_step'], '.1f')} | "
                     f"{fmt(r['wall_seconds'], '.0f')} |")
    flags = [r["flags"] or [] for r in summary["arms"].values()]
    n = 0  # the shared flags: the longest common prefix (common_flags first, then the arm's own)
    while flags and all(len(f) > n for f in flags) and len({f[n] for f in flags}) == 1:
        n += 1
    if n and flags[0][n - 1].startswith("--"):  # end on a whole option: "--credit" goes with its value
        n -= 1
    lines += ["", f"Recipe `recipes/grpo.py`, shared flags: `{shlex.join(flags[0][:n]) if flags else ''}`", "",
              "Arm flags: " + "; ".join(f"{name}: `{shlex.join(f[n:])}`" for name, f in zip(summary["arms"], flags)), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="real_lm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="run sizes: 'cpu' (SmolLM2-135M-Instruct, 4 prompts x 4 completions, 48 new tokens, 8 steps "
                        "per arm, 32 held-out questions; about 20-25 min for the three arms on 2 busy cores) or "
                        "'gpu' (a Qwen2.5-0.5B/1.5B-class --model on CUDA, 16 x 8, 256 new tokens, 40 steps, 256 "
                        "held-out questions). Flags below override the preset. (default: cpu)")
    p.add_argument("--model", default=None, help="model folder (or hub name) every arm starts from. Default: "
                   "SmolLM2-135M-Instruct, materialised once by creditlib.rl.pretrained (the 'gpu' preset needs one). "
                   "With --init-from-config: the folder to write.")
    p.add_argument("--out", default="runs/real_lm", help="output folder: the data sets, one run folder per arm, "
                   "summary.json, results.md (default: runs/real_lm)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run, of {', '.join(ARMS)} "
                   f"(default: all)")
    p.add_argument("--device", default=None, help="recipe --device: 'cpu', 'cuda', 'cuda:N' (default: the preset's)")
    p.add_argument("--dtype", default=None, help="recipe --dtype: auto, float32, bfloat16 (default: the preset's)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per RL step K (default: the preset's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="completions per prompt G; a multiple of 4 for the tree arm (default: the preset's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length cap (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per arm (default: the preset's)")
    p.add_argument("--heldout", type=int, default=None, help="held-out questions (default: the preset's)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="sampled completions per held-out question for the sampled accuracy (default: the preset's)")
    p.add_argument("--train-size", type=int, default=None, help="training questions written (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate, no warm-up (default: the preset's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the preset's)")
    p.add_argument("--ops", default=None, help="arithmetic operations drawn, of + - * (default: the preset's: "
                   "'+-' on cpu, '+-*' on gpu)")
    p.add_argument("--max-operand", type=int, default=None, help="largest operand (default: the preset's: 20 on cpu, "
                   "where SmolLM2-135M answers about 30%% greedily, so groups have reward variance; 99 on gpu)")
    p.add_argument("--instruction", default="Answer with just the final number.",
                   help="recipe --instruction appended to every question (default: %(default)r)")
    p.add_argument("--seed", type=int, default=0, help="recipe --seed, the same for every arm (default: 0)")
    p.add_argument("--num-threads", type=int, default=0,
                   help="recipe --num-threads (0 = the recipe's choice from cores and load) (default: 0)")
    p.add_argument("--plan", action="store_true", help="print the sizes, the arms' commands and an estimated wall "
                   "time; launch nothing")
    p.add_argument("--init-from-config", metavar="SHAPE", choices=sorted(SHAPES), default=None,
                   help=f"write a random-init Qwen2 model of SHAPE ({', '.join(SHAPES)}) to --model with --tokenizer's "
                        "files, then exit (no Hub access needed; accuracy of such a model is zero)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --init-from-config (default: the "
                   "SmolLM2 folder of creditlib.rl.pretrained)")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left at None from the preset; check them."""
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    for x in a.arms:
        if x not in ARMS:
            raise ValueError(f"--arms: unknown arm {x!r}; expected some of {', '.join(ARMS)}")
    for k in ("prompts_per_step", "group_size", "max_new_tokens", "steps", "heldout", "train_size"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0, got {a.eval_samples}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {a.lr}")
    for arm in a.arms:
        arm_flags(arm, a.group_size)  # the tree arm needs a group size its leaves can fill
    return a


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.init_from_config:
        if not a.model:
            parser.error("--init-from-config needs --model DIR: the folder to write")
        try:
            path = init_from_config(a.init_from_config, a.model, a.tokenizer or default_model(), seed=a.seed)
        except ValueError as e:
            parser.error(str(e))
        print(path)
        return 0
    try:
        a = resolve(a)
    except ValueError as e:
        parser.error(str(e))
    out = Path(a.out)
    train_p, held_p = out / "data" / "train.jsonl", out / "data" / "heldout.jsonl"
    if a.plan:
        if a.model is None:  # the SmolLM2 folder when already converted; --plan converts nothing
            from creditlib.rl.pretrained import default_cache_dir, is_complete

            folder = os.path.join(default_cache_dir(), "smollm2")
            a.model = folder if is_complete(folder) else "<SmolLM2-135M-Instruct, converted on the first run>"
        est = estimate_seconds(a)
        print(json.dumps(sizes(a), indent=1))
        for arm in a.arms:
            print(f"{arm}: {shlex.join(recipe_command(a, arm, train_p, held_p, out / arm))}")
        basis = ("seconds per token measured for SmolLM2-135M on 2 shared CPU cores, 1 torch thread" if a.preset == "cpu"
                 else "seconds per token guessed for a 0.5B model on one H100, NOT measured")
        print(f"estimated wall time: {est / 60:.0f} min for {len(a.arms)} arm(s), if every completion runs to "
              f"--max-new-tokens ({basis}; a busier machine is slower)")
        return 0
    if a.model is None:
        if a.preset == "gpu":
            parser.error("--preset gpu needs --model DIR (a Qwen2.5-class folder; --init-from-config makes one)")
        a.model = default_model()
    train, held = make_sets(a.train_size, a.heldout, ops=a.ops, max_operand=a.max_operand)
    write_rows(train_p, train)
    write_rows(held_p, held)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else \
        shlex.join(["real_lm.py", *argv])
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for arm in a.arms:
        run_dir = out / arm
        flags = common_flags(a, train_p, held_p) + arm_flags(arm, a.group_size)
        st = arm_state(run_dir)
        if st and st.get("flags") != flags:
            raise SystemExit(f"real_lm.py: error: {run_dir} holds a run made with other flags; use another --out "
                             f"(nothing was deleted)")
        if finished(run_dir, a.steps):
            print(f"[{arm}] finished earlier in {run_dir}: skipped", flush=True)
            continue
        from creditlib.rl.checkpoint import latest_checkpoint
        from creditlib.rl.loop import run_artefacts

        resume = latest_checkpoint(run_dir) is not None
        cmd = recipe_command(a, arm, train_p, held_p, run_dir, resume=resume)
        if not resume and st and run_artefacts(run_dir):  # this study's own arm, stopped before its first checkpoint
            cmd.append("--overwrite")  # the recipe deletes that run's files in run_dir, nothing else
        print(f"[{arm}] {'resuming' if resume else 'starting'}: {shlex.join(cmd)}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "study_arm.json").write_text(json.dumps({"flags": flags, "wall_seconds": st.get("wall_seconds", 0.0)}))
        t_arm = time.time()
        with open(run_dir / "recipe.log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode  # paths: from this cwd
        wall = st.get("wall_seconds", 0.0) + time.time() - t_arm
        (run_dir / "study_arm.json").write_text(json.dumps({"flags": flags, "wall_seconds": wall}))
        if rc != 0 or not finished(run_dir, a.steps):
            tail = "".join((run_dir / "recipe.log").read_text().splitlines(keepends=True)[-25:])
            raise SystemExit(f"real_lm.py: error: arm {arm} failed (exit {rc}); rerun to resume. Log tail "
                             f"({run_dir / 'recipe.log'}):\n{tail}")
        print(f"[{arm}] done in {wall:.0f} s", flush=True)
    arms = {arm: collect(out / arm) for arm in a.arms}
    for arm, r in arms.items():
        bad = [k for k in ("greedy_before", "greedy_after", "generated_tokens", "seconds_per_step")
               if r[k] is None or not math.isfinite(r[k])]
        if bad:
            raise SystemExit(f"real_lm.py: error: arm {arm}: non-finite or missing {bad} in its metrics.jsonl")
    summary = {"title": "smoke-scale check, not a result", "sizes": sizes(a), "machine": machine(a.device),
               "random_weights": (Path(a.model) / "creditlib-random-init.json").is_file(),
               "load_start": load_start, "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
               "command": command, "wall_seconds": sum(r["wall_seconds"] or 0.0 for r in arms.values()),
               "invocation_seconds": time.time() - t0, "train_file": str(train_p),
               "heldout_file": str(held_p), "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = results_md(summary)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
