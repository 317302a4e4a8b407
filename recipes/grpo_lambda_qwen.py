#!/usr/bin/env python
"""GRPO-lambda fine-tuning: supervised warm-up -> GRPO-lambda RL -> evaluation (arXiv 2510.00194).

    python recipes/grpo_lambda_qwen.py                       # embedded default, CPU, offline, a few minutes
    python recipes/grpo_lambda_qwen.py --max-steps 200 --output-dir runs/long
    python recipes/grpo_lambda_qwen.py --config recipes/configs/qwen2.5_1.5b_gsm8k.yaml   # real model (GPU)
    torchrun --nproc-per-node 2 recipes/grpo_lambda_qwen.py  # data parallel, FSDP2

With no arguments it trains a small Qwen2-architecture model from scratch on a bundled verifiable
task (chain arithmetic mod 10, written step by step) and shows held-out accuracy rising. With
``--model NAME --dataset gsm8k|math|PATH`` it is the paper's pipeline on a real model. Every option:
``--help``; the pipeline is documented in docs/recipes.md.

Algorithm (one RL step; B = K prompts x G completions, T = completion length):

    1. sample K prompts q; the old policy samples G completions o_1..o_G each       # [B, T]
    2. verifiable rewards R_i (1 if the final answer is right)                       # [B]
    3. critic-free TD error: A_i = (R_i - mean_G R) / (std_G R + 1e-4)               # [B]
    4. GRPO-lambda update: x_t = log pi(o_t) - log pi_old(o_t); z = eligibility trace of x
       with decay gamma*lam; A <- max(A, c); L = -mean_t min(e^z_t A, clip(e^z_t) A)  # [B, T] -> scalar
    5. log, evaluate held-out accuracy, checkpoint
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from creditlib import functional as F
from creditlib.rl import checkpoint as ckpt
from creditlib.rl.build import build_policy, build_reference, build_rollout
from creditlib.rl.config import parse_args
from creditlib.rl.data import build_source
from creditlib.rl.distributed import all_reduce_dict_mean, barrier, finish, init_distributed, shard_model
from creditlib.rl.metrics import MetricsLogger, plot_metrics, read_metrics, summary_table
from creditlib.rl.model import NonFiniteError, count_parameters, resolve_device
from creditlib.rl.rewards import SafeReward, reward_for_dataset
from creditlib.rl.train import evaluate_accuracy, make_optimizer, make_style, rl_update, sft_warmup

NAME = "GRPO-lambda"
DEFAULTS: dict = {"output_dir": "runs/grpo_lambda_qwen"}  # the algorithm defaults are RecipeConfig's


def main(argv=None, defaults=None, name=NAME, prog=None, description=None) -> dict:
    """Run the recipe; returns a summary dict (accuracies, paths). Exits non-zero on a NaN stop."""
    cfg = parse_args(argv, defaults=dict(DEFAULTS, **(defaults or {})), prog=prog, description=description or __doc__)
    t_start = time.time()

    # ---------------------------------------------------------------- 0. setup
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({info.world_size})")
    out = Path(cfg.output_dir)
    say = print if info.main else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tokenizer = build_policy(cfg, device)
    source = build_source(cfg, tokenizer)
    reward = SafeReward(reward_for_dataset(cfg.dataset), timeout=cfg.reward_timeout)
    style = make_style(cfg)  # None = plain GRPO
    model = shard_model(model, info, torch.bfloat16 if device.type == "cuda" and cfg.dtype == "auto" else None)
    model.train()
    heldout = source.heldout(cfg.eval_size)
    say(f"{name}: {count_parameters(model):,}-parameter {type(model).__name__} on {device} "
        f"(x{info.world_size}), dataset {cfg.dataset!r}, trace {style or 'off (plain GRPO)'}, "
        f"clamp {cfg.clamp_min}, {len(heldout)} held-out prompts -> {out}")

    resume_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    logger = MetricsLogger(out / "metrics.jsonl", enabled=info.main,
                           resume_step=None if resume_from is None else ckpt.read_trainer_state(resume_from)["step"])
    hf_rollout = build_rollout(replace(cfg, rollout="hf"), model, tokenizer, source, info)

    engine = {"eval": hf_rollout}  # evaluation uses the vLLM engine too, once it exists

    def evaluate() -> float:
        return evaluate_accuracy(engine["eval"], source, heldout, reward, info, device)

    optimizer = make_optimizer(model, cfg)
    ref_model = None

    # ---------------------------------------------------------------- 1. warm-up (or resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, info)
        say(f"resumed from {resume_from} (RL step {state['step']}, data position {state['position']})")
    else:
        torch.manual_seed(cfg.seed + 1000 * info.rank + 1)  # per-rank sampling streams
        t0 = time.time()
        acc_init = evaluate()
        logger.log({"phase": "sft", "step": 0, "val_accuracy": None, "heldout_accuracy": acc_init})
        sft = {"sft_steps": 0, "sft_val_accuracy": None, "position": 0}
        if cfg.sft_steps:
            sft = sft_warmup(model, source, cfg, info, device, evaluate_validation(hf_rollout, source, reward, info, device),
                             logger.log, cfg.progress)
        acc_before = evaluate()
        state = {"step": 0, "position": sft["position"], "acc_init": acc_init, "acc_before": acc_before,
                 "sft_steps": sft["sft_steps"], "sft_seconds": time.time() - t0, "rl_seconds": 0.0}
        logger.log({"phase": "eval", "step": 0, "accuracy": acc_before})
        if cfg.kl_coef > 0:  # the reference policy = the warm-up result (or the initial model)
            ref_sd = ckpt.model_state_dict(model, info)
            if info.main:
                out.mkdir(parents=True, exist_ok=True)
                ckpt.save_weights(ref_sd, out / "reference.safetensors")
        optimizer = make_optimizer(model, cfg)
        ckpt.save_checkpoint(out, 0, model, optimizer, state, info, keep=cfg.keep_checkpoints + 1)
    if cfg.kl_coef > 0:
        barrier(info)
        ref_model = build_reference(cfg, device, ckpt.load_weights(out / "reference.safetensors"), info)
    rollout = hf_rollout  # transformers generate; or a colocated vLLM engine loaded with the current weights
    if cfg.rollout == "vllm":
        rollout = build_rollout(cfg, model, tokenizer, source, info,
                                sync=ckpt.model_state_dict(model, info, every_rank=True))
    engine["eval"] = rollout

    stop = {"signal": None}  # SIGTERM / SIGINT: finish the step, checkpoint, exit
    old_handlers = {sig: signal.signal(sig, lambda s, f: stop.__setitem__("signal", s))
                    for sig in (signal.SIGTERM, signal.SIGINT)}

    # ---------------------------------------------------------------- 2. GRPO-lambda
    from tqdm.auto import tqdm

    K, G = cfg.prompts_per_step // info.world_size, cfg.group_size  # prompts per rank, group size
    step, position, last_saved = state["step"], state["position"], state["step"]
    acc = state.get("acc_last", state["acc_before"])
    bar = tqdm(total=cfg.max_steps, initial=step, desc=name, disable=not (cfg.progress and info.main),
               dynamic_ncols=True)
    t_rl = time.time() - state.get("rl_seconds", 0.0)
    exit_code = 0
    try:
        while step < cfg.max_steps and stop["signal"] is None:
            step += 1
            t0 = time.time()
            # 1. sample K prompts, G completions each from the old policy
            prompts, position = source.next_batch(position, cfg.prompts_per_step)  # global batch
            mine = prompts[info.rank::info.world_size]  # this rank's K prompts
            prompt_ids, prompt_mask = source.encode(mine, device)  # [K, P]
            batch = rollout.rollout(prompt_ids, prompt_mask, G)  # B = K*G: completion_ids/mask [B, T]
            # 2. verifiable rewards
            answers = [e.answer for e in mine for _ in range(G)]  # [B]
            rewards, rstats = reward(batch.texts, answers)  # [B] float32, failures count as wrong
            # 3. critic-free TD error: the group-relative advantage of every token of o_i
            adv = F.group_advantage(rewards, G, scale=cfg.advantage_scale,
                                    baseline=cfg.advantage_baseline).to(device)  # [B]
            # 4. GRPO-lambda update: trace over token log-ratios, negative-advantage clamp, PPO clip
            lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            m = rl_update(model, optimizer, batch, adv, cfg, info, style, ref_model)
            if cfg.rollout == "vllm":
                rollout.sync_weights(ckpt.model_state_dict(model, info, every_rank=True))
            # 5. log, evaluate, checkpoint
            m.update(reward=float(rewards.mean()), completion_len=float(batch.completion_mask.sum(-1).float().mean()),
                     **rstats)
            m = all_reduce_dict_mean(m, info)
            m.update(phase="rl", step=step, position=position, lr=lr, step_seconds=time.time() - t0)
            logger.log(m)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                acc = evaluate()
                logger.log({"phase": "eval", "step": step, "accuracy": acc})
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.2f}", heldout_acc=f"{acc:.2f}", loss=f"{m['loss']:.3f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop["signal"] is not None:
                state.update(step=step, position=position, acc_last=acc, rl_seconds=time.time() - t_rl)
                ckpt.save_checkpoint(out, step, model, optimizer, state, info, keep=cfg.keep_checkpoints)
                last_saved = step
    except (NonFiniteError, ckpt.NonFiniteWeightsError) as e:
        bar.close()
        last = ckpt.latest_checkpoint(out)
        print(f"\n{name}: stopped at RL step {step}: {e}.\nThe last good checkpoint is {last} (RL step "
              f"{last_saved}); nothing was written after it. Resume with --resume (e.g. with a lower --lr).",
              file=sys.stderr)
        exit_code = 1
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    bar.close()
    if stop["signal"] is not None and exit_code == 0:
        if last_saved != step:
            state.update(step=step, position=position, acc_last=acc, rl_seconds=time.time() - t_rl)
            ckpt.save_checkpoint(out, step, model, optimizer, state, info, keep=cfg.keep_checkpoints)
        say(f"{name}: stopped by signal {stop['signal']} after RL step {step}; checkpoint saved, resume with --resume")
        finish(info, 128 + int(stop["signal"]))
        raise SystemExit(128 + int(stop["signal"]))
    if exit_code:
        finish(info, exit_code)
        raise SystemExit(exit_code)

    # ---------------------------------------------------------------- 3. evaluation summary and artefacts
    final = out / "final"
    full_sd = ckpt.model_state_dict(model, info)
    summary = {"accuracy_initial": state["acc_init"], "accuracy_before": state["acc_before"], "accuracy_after": acc,
               "steps": step, "output_dir": str(out), "wall_seconds": time.time() - t_start}
    if info.main:
        inner = getattr(model, "module", model)
        inner.save_pretrained(final, state_dict=full_sd)
        tokenizer.save_pretrained(final)
        recs = read_metrics(out / "metrics.jsonl")
        rl = [r for r in recs if r.get("phase") == "rl"]
        png = plot_metrics(out / "metrics.jsonl", out / "metrics.png", f"{name} on {cfg.dataset}") if cfg.plot else None
        first = rl[:10]
        last = rl[-10:]
        mean = lambda rs: sum(r["reward"] for r in rs) / max(1, len(rs))  # noqa: E731
        rows = [
            ("held-out accuracy, initial model", f"{state['acc_init']:.3f}"),
            (f"held-out accuracy, before RL (after {state['sft_steps']} warm-up steps)", f"{state['acc_before']:.3f}"),
            (f"held-out accuracy, after {step} RL steps", f"{acc:.3f}"),
            (f"train reward, first {len(first)} / last {len(last)} RL steps", f"{mean(first):.3f} / {mean(last):.3f}"),
            ("held-out prompts (greedy decoding)", len(heldout)),
            ("reward failures (errors / timeouts)", f"{reward.total_errors} / {reward.total_timeouts}"),
            ("wall time: warm-up / RL / total", f"{state['sft_seconds']:.0f} s / {time.time() - t_rl:.0f} s / "
                                                f"{time.time() - t_start:.0f} s (this process)"),
            ("metrics", out / "metrics.jsonl"),
            ("plot", png or "(--no-plot)"),
            ("checkpoint / final model", f"{ckpt.latest_checkpoint(out)} / {final}"),
        ]
        print("\n" + summary_table(rows, (f"{name} summary", "")))
        summary["plot"] = str(png) if png else None
    finish(info, 0)
    return summary


def evaluate_validation(rollout, source, reward, info, device):
    """The warm-up's early-stop check: greedy accuracy on the validation split (not the test split)."""
    val = source.validation(256)
    return lambda: evaluate_accuracy(rollout, source, val, reward, info, device)


if __name__ == "__main__":
    main()
