#!/usr/bin/env python
"""GRPO fine-tuning with a pluggable credit-assignment method: supervised warm-up -> RL -> evaluation.

    python recipes/grpo.py                               # plain GRPO on the embedded task (CPU, offline, minutes)
    python recipes/grpo.py --credit grpo-lambda          # GRPO-lambda (arXiv 2510.00194): recipes/grpo_lambda.py
    python recipes/grpo.py --credit prefix-gae --max-steps 200 --output-dir runs/prefix-gae
    python recipes/grpo.py --config recipes/configs/qwen2.5_1.5b_gsm8k.yaml    # a real model (GPU)
    torchrun --nproc-per-node 2 recipes/grpo.py          # data parallel, FSDP2

With no arguments it trains a small Qwen2-architecture model from scratch on a bundled verifiable
task, a walk on a 10-digit dial written step by step (prompt ``7++-?``, completion ``898=8``: the
position after every move, then the final one; the reward checks the final position), and shows
held-out accuracy rising. With ``--model NAME_OR_PATH --dataset gsm8k|math|FILE`` it runs any causal
LM (Qwen, LLaMA, ...). ``--credit NAME`` picks the credit-assignment method from
``creditlib.credit`` (``--help`` lists them); the options of its group override the method's values.

One RL step (``grpo_step`` below; B = K prompts x G completions, T = completion length):

    1. rollout: K prompts, G completions each from the current policy        # tokens, mask [B, T]
    2. verifiable rewards R_i (1 if the final answer is right)                # [B]
    3. credit stage, a TensorDictSequential of creditlib modules:
         CriticFreeTD   A_i = (R_i - mean_G R) / (std_G R + 1e-4)             # [B, 1, 1]
      or PrefixTD       per-token prefix-tree TD error, GAE over it           # [B, T, 1]
         ClampNegative  A <- max(A, c)                                         # same shape
         EntropySelect  the top-entropy ("forking") tokens of the loss        # bool [B, T]
    4. GRPOLambdaLoss (a TorchRL GRPOLoss): x_t = log pi(o_t) - log pi_old(o_t),
       z = the method's trace of x (GRPO: z = x), L = -agg_t min(e^z_t A, clip(e^z_t) A)   # [B, T] -> scalar
    5. backward, gradient clipping, AdamW; then log, evaluate, checkpoint

Every option: ``--help``; the pipeline: docs/recipes.md.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional

if __package__ in (None, ""):  # run as a script from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential

from creditlib import ClampNegative, CriticFreeTD
from creditlib.losses import GRPOLambdaLoss
from creditlib.modules import EntropySelect, PrefixTD
from creditlib.rl import checkpoint as ckpt
from creditlib.rl.build import build_policy, build_reference, build_rollout, max_new_tokens
from creditlib.rl.config import CREDIT_OPTIONS, INHERIT, config_to_dict, parse_args, resolve_credit
from creditlib.rl.data import build_source
from creditlib.rl.distributed import all_reduce_dict_mean, barrier, finish, init_distributed, shard_model
from creditlib.rl.loop import (StopSignals, init_weights, learning_rate, nonfinite_message, start_point,
                               write_summary)
from creditlib.rl.metrics import MetricsLogger, make_reporter
from creditlib.rl.model import NonFiniteError, completion_logprobs, count_parameters, resolve_device
from creditlib.rl.policy import CompletionPolicy
from creditlib.rl.rewards import SafeReward, reward_for_dataset
from creditlib.rl.train import all_finite, clip_grad_norm, evaluate, make_optimizer, sft_warmup

NAME = "GRPO"
DEFAULTS: Dict[str, Any] = {"credit": "grpo", "output_dir": "runs/grpo"}  # everything else: RecipeConfig's defaults

RESPONSE, MASK, LOSS_MASK = ("tokens", "response"), ("masks", "response"), ("masks", "loss")  # tensordict keys


# ==================================================================== the credit and loss stages
def credit_stage(method, group_size: int) -> TensorDictSequential:
    """The advantage stage of a credit method, from creditlib's TensorDict modules.

    Reads ``reward`` ``[B, 1, 1]`` (and the completion tokens / mask / entropy when the method needs
    them); writes ``advantage`` ``[B, 1, 1]`` (group methods) or ``[B, T, 1]`` (prefix-tree methods),
    ``adv_clamped`` (clamp) and the loss mask ``("masks", "loss")`` (entropy selection).
    """
    if method.advantage == "group":  # one advantage per completion: the group is the baseline
        stages = [CriticFreeTD(group_size, scale=method.scale, baseline=method.baseline)]  # [B, 1, 1]
    else:  # per token: the value of a prefix = mean reward of the other completions sharing it
        stages = [PrefixTD(group_size, scale=method.scale, gamma=method.gamma, lam=method.lam,
                           tokens_key=RESPONSE, mask_key=MASK, keepdim=True)]  # [B, T, 1]
    if method.clamp_min is not None:
        stages.append(ClampNegative(method.clamp_min, clamped_key="adv_clamped"))
    if method.entropy_quantile is not None:
        stages.append(EntropySelect(method.entropy_quantile, entropy_key="entropy", mask_key=MASK,
                                    out_key=LOSS_MASK))  # bool [B, T]
    return TensorDictSequential(*stages)


def policy_loss(method, policy: CompletionPolicy, cfg, T: int) -> GRPOLambdaLoss:
    """TorchRL's GRPOLoss with the method's log-ratio trace (``method.trace``; ``None`` = the token ratio).

    The clamp already ran in the credit stage; an entropy-selecting method keeps the policy term of
    the selected tokens only (``select_key``; the aggregation still counts every completion token,
    TRL's ``top_entropy_quantile`` convention); no entropy bonus; the optional KL to a frozen
    reference is GRPOLoss's ``kl_to_ref``.
    """
    loss = GRPOLambdaLoss(policy, style=method.trace, clamp_min=None, clip_epsilon=cfg.clip_eps,
                          select_key=LOSS_MASK if method.needs_entropy else None,
                          aggregation=cfg.aggregation,
                          loss_scale_factor=T if cfg.aggregation == "seq-mean-token-sum-norm" else None,
                          entropy_bonus=False, kl_to_ref_coeff=cfg.kl_coef if cfg.kl_coef > 0 else None)
    loss.set_keys(action=RESPONSE, sample_log_prob=("log_probs", "response"),
                  ref_log_probs=("ref_log_probs", "response"))
    return loss


# ==================================================================== setup
@dataclass
class Recipe:
    """Everything a run holds (built by :func:`setup`)."""

    cfg: Any
    name: str
    info: Any
    device: torch.device
    out: Path
    model: Any
    tokenizer: Any
    source: Any
    reward: SafeReward
    method: Any
    credit: TensorDictSequential
    scorer: CompletionPolicy  # the sampling policy's log-probs (and entropies) before the update
    loss_fn: GRPOLambdaLoss
    optimizer: torch.optim.Optimizer
    hf_rollout: Any
    rollout: Any
    heldout: list
    start: Any
    logger: MetricsLogger
    samples: MetricsLogger
    n_updates: int
    ref_model: Any = None
    say: Any = print


def setup(cfg, name: str = NAME) -> Recipe:
    """Model, data, reward, the credit stage and the loss of a config; where the run starts.

    Raises (before anything is written to the output directory) when ``--resume`` finds only
    damaged checkpoints or ``--init-from`` names no checkpoint.
    """
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({info.world_size})")
    out = Path(cfg.output_dir)
    say = print if info.main else (lambda *a, **k: None)
    start = start_point(cfg, say)  # --resume / --init-from / fresh; raises before anything is overwritten
    method = resolve_credit(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tokenizer = build_policy(cfg, device)
    if start.kind == "init":  # another run's weights (e.g. a shared warm-up), loaded before sharding
        model.load_state_dict({k: v.to(device) for k, v in init_weights(start).items()})
    source = build_source(cfg, tokenizer)
    reward = SafeReward(reward_for_dataset(cfg.dataset), timeout=cfg.reward_timeout)
    model = shard_model(model, info, torch.bfloat16 if device.type == "cuda" and cfg.dtype == "auto" else None)
    model.train()
    heldout = source.heldout(cfg.eval_size)

    K, G = cfg.prompts_per_step // info.world_size, cfg.group_size
    mb = cfg.minibatch_size or K * G
    n_updates = cfg.ppo_epochs * math.ceil(K * G / mb)  # optimizer steps per RL step
    policy = CompletionPolicy(model, cfg.temperature, on_policy=n_updates == 1)
    scorer = CompletionPolicy(model, cfg.temperature, entropy=method.needs_entropy)
    hf_rollout = build_rollout(replace(cfg, rollout="hf"), model, tokenizer, source, info)
    T = max_new_tokens(cfg, source)

    reporter = make_reporter(cfg.report_to, out, config_to_dict(cfg), name=f"{name} {cfg.credit}",
                             resume_step=start.resume_step) if info.main else None
    logger = MetricsLogger(out / "metrics.jsonl", resume_step=start.resume_step, enabled=info.main, reporter=reporter)
    samples = MetricsLogger(out / "samples.jsonl", resume_step=start.resume_step, enabled=info.main)
    over = {k: getattr(cfg, k) for k in CREDIT_OPTIONS if getattr(cfg, k) != INHERIT}  # the overridden values
    say(f"{name}: {count_parameters(model):,}-parameter {type(model).__name__} on {device} (x{info.world_size}), "
        f"dataset {cfg.dataset!r}, {len(heldout)} held-out prompts -> {out}\n"
        f"credit {cfg.credit}{f' with {over}' if over else ''}: {method.summary()}")
    return Recipe(cfg=cfg, name=name, info=info, device=device, out=out, model=model, tokenizer=tokenizer,
                  source=source, reward=reward, method=method, credit=credit_stage(method, G), scorer=scorer,
                  loss_fn=policy_loss(method, policy, cfg, T), optimizer=make_optimizer(model, cfg),
                  hf_rollout=hf_rollout, rollout=hf_rollout, heldout=heldout, start=start, logger=logger,
                  samples=samples, n_updates=n_updates, say=say)


# ==================================================================== one RL step
def grpo_step(r: Recipe, batch, rewards: torch.Tensor) -> Dict[str, float]:
    """One GRPO update on ``B = K x G`` completions: credit stage, then PPO epochs over minibatches.

    Never takes an optimizer step on a NaN/inf loss or gradient norm (raises ``NonFiniteError``
    first: the weights and optimizer state stay those of the last good step).
    """
    cfg, B = r.cfg, batch.batch_size
    mask = batch.completion_mask  # [B, T] bool
    td = TensorDict({
        "tokens": {"prompt": batch.prompt_ids, "response": batch.completion_ids},  # [B, P], [B, T]
        "masks": {"prompt": batch.prompt_mask, "response": mask},  # [B, P], [B, T]
        "reward": rewards.to(r.device).reshape(B, 1, 1),  # [B, 1, 1]: GRPOLoss broadcasts it over T
    }, batch_size=[B])
    mb = cfg.minibatch_size or B
    # the sampling policy's log-probs (and per-token entropies for entropy selection): one extra
    # forward; a single update on fresh samples skips it (CompletionPolicy(on_policy=True))
    if r.n_updates > 1 or r.method.needs_entropy:
        with torch.no_grad():
            parts = [r.scorer(td[i:i + mb]) for i in range(0, B, mb)]
        td.update(torch.cat(parts).select(*r.scorer.out_keys))  # ("log_probs", "response") [B, T] (+ entropy)
    if r.ref_model is not None:  # frozen reference for the KL term
        with torch.no_grad():
            td["ref_log_probs", "response"] = completion_logprobs(
                r.ref_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.temperature)  # [B, T]
    td = r.credit(td)  # advantage [B, 1, 1] or [B, T, 1] (+ adv_clamped, loss mask)

    sums: Dict[str, float] = {}
    n_mb = math.ceil(B / mb)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B) if n_mb > 1 else torch.arange(B)  # [B]
        for i in range(0, B, mb):
            sub = td if n_mb == 1 else td[perm[i:i + mb].to(r.device)]  # [b]
            out = r.loss_fn(sub)  # PPO-clipped surrogate over the (traced) ratio, aggregated to a scalar
            loss = out.loss_objective + (out.loss_kl_to_ref if cfg.kl_coef > 0 else 0.0)
            if not all_finite(loss.detach().cpu(), r.info):
                raise NonFiniteError(f"the RL loss is {float(loss.detach()):.4g} (NaN/inf); no update was applied")
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = clip_grad_norm(r.model, cfg.max_grad_norm)
            if not all_finite(gnorm, r.info):
                r.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"the gradient norm is {float(gnorm):.4g} (NaN/inf); no update was applied")
            r.optimizer.step()
            m = {"loss": float(loss.detach()), "loss_policy": float(out.loss_objective.detach()),
                 "grad_norm": float(gnorm), "traced_clip_fraction": float(out.traced_clip_fraction),
                 "trace_abs_mean": float(out.trace_abs_mean), "approx_kl": float(out.kl_approx),
                 "ess": float(out.ESS)}
            if cfg.kl_coef > 0:
                m["kl_to_ref"] = float(out.kl_to_ref)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / r.n_updates
    r.optimizer.zero_grad(set_to_none=True)
    sums["num_tokens"] = float(mask.sum())
    selected = td.get(LOSS_MASK) if r.method.needs_entropy else mask  # [B, T] tokens with a policy term
    sums["loss_tokens_fraction"] = float(selected.sum()) / max(1.0, sums["num_tokens"])
    if "adv_clamped" in td.keys():
        c = td["adv_clamped"].reshape(B, -1)  # [B, 1] or [B, T]
        sums["adv_clamped_fraction"] = float(c.float().mean() if c.shape[1] == 1 else c[mask].float().mean())
    else:
        sums["adv_clamped_fraction"] = 0.0
    return sums


# ==================================================================== train: warm-up -> RL -> evaluation
def evaluate_and_log(r: Recipe, engine, step: int) -> Dict:
    """Held-out greedy (and sampled) accuracy; a few completions to samples.jsonl."""
    cfg = r.cfg
    res = evaluate(engine, r.source, r.heldout, r.reward, r.info, r.device, samples=cfg.eval_samples,
                   log_samples=cfg.log_samples)
    rec = {"phase": "eval", "step": step, "accuracy": res["accuracy"]}
    rec.update({k: v for k, v in res.items() if k not in ("accuracy", "samples")})
    r.logger.log(rec)
    for s in res["samples"]:
        r.samples.log({"phase": "eval", "step": step, **s})
    return res


def warm_up(r: Recipe) -> Dict:
    """Fresh start: evaluate, supervised warm-up, evaluate. ``--init-from``: evaluate the loaded weights."""
    cfg, info = r.cfg, r.info
    torch.manual_seed(cfg.seed + 1000 * info.rank + 1)  # per-rank sampling streams
    t0 = time.time()
    if r.start.kind == "init":
        acc_init, sft = r.start.state.get("acc_init"), {"sft_steps": 0, "position": r.start.state.get("position", 0)}
        r.say(f"--init-from {r.start.path}: its weights, a fresh optimizer, RL step 0, data position {sft['position']}")
    else:
        acc_init = evaluate(r.hf_rollout, r.source, r.heldout, r.reward, info, r.device)["accuracy"]
        r.logger.log({"phase": "sft", "step": 0, "val_accuracy": None, "heldout_accuracy": acc_init})
        sft = {"sft_steps": 0, "position": 0}
        if cfg.sft_steps:
            val = r.source.validation(256)
            validate = lambda: evaluate(r.hf_rollout, r.source, val, r.reward, info, r.device)["accuracy"]  # noqa: E731
            sft = sft_warmup(r.model, r.source, cfg, info, r.device, validate, r.logger.log, cfg.progress, say=r.say)
    before = evaluate_and_log(r, r.hf_rollout, 0)
    return {"step": 0, "position": sft["position"], "acc_init": acc_init, "acc_before": before["accuracy"],
            "sampled_before": before.get("sampled_accuracy"), "sft_steps": sft["sft_steps"],
            "sft_seconds": time.time() - t0, "rl_seconds": 0.0,
            "init_from": str(r.start.path) if r.start.kind == "init" else None}


def train(r: Recipe) -> Dict:
    cfg, info, out = r.cfg, r.info, r.out
    t_start = time.time()
    # ---------------------------------------------------------------- 1. warm-up (or resume)
    if r.start.kind == "resume":
        state = ckpt.load_checkpoint(r.start.path, r.model, r.optimizer, info)
        r.say(f"resumed from {r.start.path} (RL step {state['step']}, data position {state['position']})")
    else:
        state = warm_up(r)
        if cfg.kl_coef > 0:  # the reference policy = the RL starting point
            ref_sd = ckpt.model_state_dict(r.model, info)
            if info.main:
                out.mkdir(parents=True, exist_ok=True)
                ckpt.save_weights(ref_sd, out / "reference.safetensors")
        r.optimizer = make_optimizer(r.model, cfg)  # fresh: the warm-up's steps are not RL steps
        ckpt.save_checkpoint(out, 0, r.model, r.optimizer, state, info, keep=cfg.keep_checkpoints + 1)
    if cfg.kl_coef > 0:
        barrier(info)
        r.ref_model = build_reference(cfg, r.device, ckpt.load_weights(out / "reference.safetensors"), info)
    if cfg.rollout == "vllm":  # a colocated vLLM engine loaded with the current weights
        r.rollout = build_rollout(cfg, r.model, r.tokenizer, r.source, info,
                                  sync=ckpt.model_state_dict(r.model, info, every_rank=True))

    # ---------------------------------------------------------------- 2. RL
    from tqdm.auto import tqdm

    G = cfg.group_size
    step, position, last_saved = state["step"], state["position"], state["step"]
    acc = {"accuracy": state.get("acc_last", state["acc_before"]),
           "sampled_accuracy": state.get("sampled_last", state.get("sampled_before"))}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{r.name} ({cfg.credit})",
               disable=not (cfg.progress and info.main), dynamic_ncols=True)
    t_rl = time.time() - state.get("rl_seconds", 0.0)

    def save(step):
        state.update(step=step, position=position, acc_last=acc["accuracy"], sampled_last=acc.get("sampled_accuracy"),
                     rl_seconds=time.time() - t_rl)
        ckpt.save_checkpoint(out, step, r.model, r.optimizer, state, info, keep=cfg.keep_checkpoints)

    exit_code = 0
    with StopSignals() as stop:  # SIGTERM / SIGINT: finish the step, checkpoint, exit
        try:
            while step < cfg.max_steps and not stop.any_rank(info):
                step += 1
                t0 = time.time()
                # 1. sample K prompts, G completions each from the current policy
                prompts, position = r.source.next_batch(position, cfg.prompts_per_step)  # global batch
                mine = prompts[info.rank::info.world_size]  # this rank's K prompts
                prompt_ids, prompt_mask = r.source.encode(mine, r.device)  # [K, P]
                batch = r.rollout.rollout(prompt_ids, prompt_mask, G)  # B = K*G: completion ids/mask [B, T]
                # 2. verifiable rewards
                rewards, rstats = r.reward(batch.texts, [e.answer for e in mine for _ in range(G)])  # [B]
                # 3-4. credit stage + PPO update
                lr = learning_rate(cfg, step)
                for group in r.optimizer.param_groups:
                    group["lr"] = lr
                m = grpo_step(r, batch, rewards)
                if cfg.rollout == "vllm":
                    r.rollout.sync_weights(ckpt.model_state_dict(r.model, info, every_rank=True))
                # 5. log, evaluate, checkpoint
                m.update(reward=float(rewards.mean()), completion_len=float(batch.completion_mask.sum(-1).float().mean()),
                         **rstats)
                m = all_reduce_dict_mean(m, info)
                m.update(phase="rl", step=step, position=position, lr=lr, step_seconds=time.time() - t0)
                r.logger.log(m)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    acc = evaluate_and_log(r, r.rollout, step)
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.2f}", heldout_acc=f"{acc['accuracy']:.2f}", loss=f"{m['loss']:.3f}")
                stopping = stop.any_rank(info)  # every rank agrees (torchrun delivers signals at different times)
                if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                    save(step)
                    last_saved = step
        except (NonFiniteError, ckpt.NonFiniteWeightsError) as e:
            bar.close()
            print(nonfinite_message(r.name, step, e, ckpt.latest_checkpoint(out), last_saved), file=sys.stderr)
            exit_code = 1
    bar.close()
    if stop.any_rank(info) and exit_code == 0:
        if last_saved != step:
            save(step)
        sig = int(stop.signal or signal.SIGTERM)  # a rank that got none stops with its peers
        r.say(f"{r.name}: stopped by signal {sig} after RL step {step}; checkpoint saved, resume with --resume")
        exit_code = 128 + sig
    if exit_code:
        r.logger.close()
        finish(info, exit_code)
        raise SystemExit(exit_code)

    # ---------------------------------------------------------------- 3. evaluation summary and artefacts
    full_sd = ckpt.model_state_dict(r.model, info)
    summary = {"accuracy_initial": state.get("acc_init"), "accuracy_before": state["acc_before"],
               "accuracy_after": acc["accuracy"], "sampled_accuracy_after": acc.get("sampled_accuracy"),
               "steps": step, "credit": cfg.credit, "output_dir": str(out), "wall_seconds": time.time() - t_start}
    if info.main:
        table, png = write_summary(r.name, cfg, out, r.model, r.tokenizer, full_sd, state, acc, step, r.reward,
                                   t_start, t_rl, len(r.heldout), [("credit method", r.method.summary())])
        print("\n" + table)
        summary["plot"] = str(png) if png else None
    r.logger.close()
    finish(info, 0)
    return summary


def main(argv=None, defaults: Optional[dict] = None, name: str = NAME, prog: Optional[str] = None,
         description: Optional[str] = None) -> dict:
    """Run the recipe; returns a summary dict (accuracies, paths). Exits non-zero on a NaN stop or a signal."""
    cfg = parse_args(argv, defaults=dict(DEFAULTS, **(defaults or {})), prog=prog, description=description or __doc__)
    try:
        r = setup(cfg, name)
    except (ckpt.CheckpointError, ValueError) as e:  # a damaged run to resume, a bad --init-from: say it, write nothing
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    return train(r)


if __name__ == "__main__":
    main()
