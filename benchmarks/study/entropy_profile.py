#!/usr/bin/env python
"""Entropy profile of a study task's warm-up model (issue 20: "check and show that ... its completions
have several uncertain tokens").

Warms the recipe's tiny model up on a task with the recipe's own code (``recipes/grpo.py``'s
``setup`` + ``warm_up``: :func:`creditlib.rl.train.sft_warmup` with the study's options, stopping at
the task's target accuracy), or loads a finished warm-up (``--init-from CHECKPOINT``, e.g. a study
run's ``sft/checkpoints/step_000000``), then samples ``--samples`` completions of each of ``--prompts``
held-out prompts at the study's temperature and measures, per completion token ``t``, the entropy of
the sampling policy

    H_t = - sum_v pi(v | prompt, o_<t) log pi(v | prompt, o_<t)        (nats, tempered logits)

It prints the mean ``H_t`` per position (over the completions that reach it), the number of tokens
per completion with ``H_t > --threshold`` (0.5 nats by default; a fair coin is ln 2 = 0.69), and, for
tasks with a known layout, the mean entropy at the positions that matter and at those that do not
(``distractor-F``: free tokens vs written steps and answer; ``multi-decision-*``: the decisions vs
the ``=`` filler; ``early`` / ``late`` / ``long``: the one decision vs the filler)::

    nice -n 10 python benchmarks/study/entropy_profile.py --task default --task distractor-4 \\
        --recipe-args "--sft-steps 400" --json runs/entropy.json --plot runs/entropy.png

``--task`` takes a study task of ``benchmarks/study/plan.py`` (``default``, ``hard``, ``early``, ``late``,
``long``: their recipe overrides) or any dataset name :func:`study.tasks.register_tasks` adds
(``walk``, ``distractor-F``, ``multi-decision-count``, ...). Every run gets the study's options
(:data:`study.plan.STUDY_DEFAULTS`) and then ``--recipe-args``, which override both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from study.plan import STUDY_DEFAULTS, TASKS  # noqa: E402
from study.tasks import register_tasks  # noqa: E402

#: moves per walk of the study-3 tasks when ``--task`` is a dataset name (``--recipe-args --num-ops``
#: overrides): ``distractor-F`` as ``default`` (10), ``multi-decision-*`` as ``early`` / ``long`` (8)
NUM_OPS = {"walk": 10, "distractor": 10, "multi-decision": 8}


def _load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_grpo_entropy", ROOT / "recipes" / "grpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def _flags(overrides: Dict) -> List[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def task_overrides(task: str) -> Dict:
    """Recipe overrides of ``--task``: the study plan's for a plan task, else ``dataset`` + ``num_ops``."""
    if task in TASKS:
        return dict(TASKS[task]["overrides"])
    family = next((f for f in NUM_OPS if task == f or task.startswith(f + "-")), None)
    return {"dataset": task, "num_ops": NUM_OPS.get(family, 8), "sft_target_accuracy": 0.45}


def layout(task_obj) -> Dict[str, List[int]]:
    """Positions (0-based, in a full solution) of the tokens that decide the reward and of those that
    do not, for the study tasks that know them (empty for the walk: every written step feeds the answer)."""
    n = task_obj.completion_length - 1  # characters of a full solution (EOS not counted)
    if hasattr(task_obj, "free_indices"):  # distractor: free tokens vs the written steps, '=' and the answer
        free = set(task_obj.free_indices)
        return {"free": sorted(free), "steps+answer": [i for i in range(n) if i not in free]}
    if hasattr(task_obj, "decision_indices"):  # multi-decision
        dec = set(task_obj.decision_indices)
        return {"decisions": sorted(dec), "filler": [i for i in range(n) if i not in dec]}
    if hasattr(task_obj, "decision_index"):  # early / late / long
        return {"decision": [task_obj.decision_index], "filler": [i for i in range(n) if i != task_obj.decision_index]}
    return {}


@torch.no_grad()
def profile(r, prompts: int, samples: int, threshold: float, batch: int = 64) -> Dict:
    """Sample ``samples`` completions of the first ``prompts`` held-out prompts with the recipe's
    sampling rollout and return the entropy profile (see the module docstring)."""
    from creditlib.rl.model import completion_logprobs

    exs = r.heldout[:prompts]
    ents, masks, rewards = [], [], []
    r.model.eval()
    for i in range(0, len(exs), batch):
        chunk = exs[i:i + batch]
        ids, mask = r.source.encode(chunk, r.device)  # [k, P]
        out = r.hf_rollout.rollout(ids, mask, samples)  # [k * samples, T]
        _, ent = completion_logprobs(r.model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                     out.completion_mask, temperature=r.cfg.temperature, return_entropy=True)  # [B, T]
        rw, _ = r.reward(out.texts, [e.answer for e in chunk for _ in range(samples)])  # [B]
        ents.append(ent.float())
        masks.append(out.completion_mask)
        rewards.append(rw.float())
    T = max(e.shape[1] for e in ents)
    ent = torch.cat([torch.nn.functional.pad(e, (0, T - e.shape[1])) for e in ents])  # [N, T]
    mask = torch.cat([torch.nn.functional.pad(m, (0, T - m.shape[1])) for m in masks])  # [N, T] bool
    reward = torch.cat(rewards)  # [N]
    if not bool(torch.isfinite(ent).all()):
        raise ValueError("the policy's entropies are not finite (a diverged model?)")
    per_pos_n = mask.sum(0)  # [T] completions that reach each position
    per_pos = torch.where(per_pos_n > 0, (ent * mask).sum(0) / per_pos_n.clamp_min(1), torch.nan)  # [T]
    high = ((ent > threshold) & mask).sum(1).float()  # [N] uncertain tokens per completion
    lengths = mask.sum(1).float()  # [N]
    res = {"completions": int(mask.shape[0]), "mean_length": float(lengths.mean()),
           "sampled_accuracy": float(reward.mean()),
           "mean_entropy_per_position": [None if math.isnan(x) else round(float(x), 4) for x in per_pos.tolist()],
           "completions_reaching_position": per_pos_n.tolist(),
           "threshold": threshold, "uncertain_tokens_mean": float(high.mean()),
           "uncertain_tokens_median": float(high.median()),
           "uncertain_tokens_histogram": {int(k): int(v) for k, v in zip(*torch.unique(high, return_counts=True))},
           "entropy_per_completion_mean": float((ent * mask).sum() / mask.sum())}
    roles = layout(r.source.task) if hasattr(r.source, "task") else {}
    for name, idx in roles.items():
        idx = [i for i in idx if i < T]
        sel = torch.zeros(T, dtype=torch.bool)
        sel[idx] = True
        m = mask & sel  # [N, T]
        res[f"role:{name}"] = {"positions": len(idx), "mean_entropy": float((ent * m).sum() / m.sum().clamp_min(1)),
                               "uncertain_per_completion": float(((ent > threshold) & m).sum(1).float().mean())}
    return res


def run_task(task: str, recipe_args: List[str], prompts: int, samples: int, threshold: float,
             out_dir: Optional[Path], grpo) -> Dict:
    work = out_dir / task if out_dir else Path(tempfile.mkdtemp(prefix=f"entropy-{task}-"))
    argv = (_flags(STUDY_DEFAULTS) + _flags(task_overrides(task))
            + ["--max-steps", "0", "--output-dir", str(work), "--overwrite", "--no-plot", "--seed", "0"] + recipe_args)
    cfg = grpo.parse_args(argv, defaults=grpo.DEFAULTS)
    t0 = time.time()
    r = grpo.setup(cfg)
    state = grpo.warm_up(r)
    warm = time.time() - t0
    t1 = time.time()
    torch.manual_seed(12345)
    res = profile(r, prompts, samples, threshold)
    res.update({"task": task, "dataset": cfg.dataset, "num_ops": cfg.num_ops, "sft_steps": state["sft_steps"],
                "heldout_greedy_accuracy": state["acc_before"], "warmup_seconds": round(warm, 1),
                "profile_seconds": round(time.time() - t1, 1), "run_dir": str(work),
                "init_from": state.get("init_from")})
    r.logger.close()
    r.samples.close()
    return res


def show(res: Dict) -> str:
    lines = [f"== {res['task']} (dataset {res['dataset']}, {res['num_ops']} moves): warm-up {res['sft_steps']} steps "
             f"({res['warmup_seconds']} s), held-out greedy acc {res['heldout_greedy_accuracy']:.3f}, sampled acc "
             f"{res['sampled_accuracy']:.3f} over {res['completions']} completions (mean length {res['mean_length']:.1f})",
             f"   tokens with entropy > {res['threshold']:g} nats per completion: mean {res['uncertain_tokens_mean']:.2f}, "
             f"median {res['uncertain_tokens_median']:g}, histogram {res['uncertain_tokens_histogram']}",
             f"   mean entropy per completion token: {res['entropy_per_completion_mean']:.3f} nats"]
    for k, v in res.items():
        if k.startswith("role:"):
            lines.append(f"   {k[5:]:>13}: {v['positions']} positions, mean entropy {v['mean_entropy']:.3f}, "
                         f"uncertain per completion {v['uncertain_per_completion']:.2f}")
    per = res["mean_entropy_per_position"]
    lines.append("   mean entropy per position: " + " ".join("-" if x is None else f"{x:.2f}" for x in per))
    return "\n".join(lines)


def plot(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for res in results:
        per = [float("nan") if x is None else x for x in res["mean_entropy_per_position"]]
        ax[0].plot(range(len(per)), per, marker=".", label=res["task"])
        hist = res["uncertain_tokens_histogram"]
        ax[1].bar([k + 0.8 * (results.index(res) / len(results) - 0.4) for k in hist],
                  [v / res["completions"] for v in hist.values()], width=0.8 / len(results), label=res["task"])
    ax[0].set(xlabel="completion position", ylabel="mean entropy (nats)", title="warm-up model: entropy per position")
    ax[1].set(xlabel=f"tokens with entropy > {results[0]['threshold']:g} nats per completion", ylabel="fraction",
              title="uncertain tokens per completion")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", required=True,
                    help="a study task (default, hard, early, late, long) or a dataset name (walk, distractor-F, "
                         "multi-decision-count, ...); repeat for several")
    ap.add_argument("--recipe-args", default="", help="recipe flags for every task, e.g. '--sft-steps 300' or "
                                                      "'--init-from RUN/checkpoints/step_000000' (skips the warm-up)")
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts sampled")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt (at the study's temperature)")
    ap.add_argument("--threshold", type=float, default=0.5, help="entropy (nats) above which a token counts as uncertain")
    ap.add_argument("--out-dir", default="", help="keep the warm-up runs (checkpoint 0) here; default: a temp folder")
    ap.add_argument("--json", default="", help="write the profiles here")
    ap.add_argument("--plot", default="", help="write a PNG of the profiles here")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.samples < 1:
        ap.error("--prompts and --samples must be >= 1")
    if not args.threshold >= 0:
        ap.error(f"--threshold must be >= 0, got {args.threshold}")
    register_tasks()
    grpo = _load_recipe()
    results = []
    for task in args.task:
        res = run_task(task, shlex.split(args.recipe_args), args.prompts, args.samples, args.threshold,
                       Path(args.out_dir) if args.out_dir else None, grpo)
        print(show(res), flush=True)
        results.append(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return results


if __name__ == "__main__":
    main()
