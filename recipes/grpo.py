#!/usr/bin/env python
"""GRPO fine-tuning with a pluggable credit-assignment method: supervised warm-up -> RL -> evaluation.

    python recipes/grpo.py                               # plain GRPO on the embedded task (CPU, offline, minutes)
    python recipes/grpo.py --credit grpo-lambda          # GRPO-lambda (arXiv 2510.00194): recipes/grpo_lambda.py
    python recipes/grpo.py --credit prefix-gae --max-steps 200 --output-dir runs/prefix-gae
    python recipes/grpo.py --output-dir runs/prefix-gae --resume   # continue that run
    python recipes/grpo.py --config recipes/configs/qwen2.5_1.5b_gsm8k.yaml    # a real model (GPU)
    python recipes/grpo.py --credit prefix-gae --tree-roots 2 --tree-branches 3   # tree rollouts, 8 leaves per prompt
    python recipes/grpo.py --env dial-walk --credit anchor-state   # multi-turn episodes, per-turn credit (GiGPO)
    torchrun --nproc-per-node 2 recipes/grpo.py          # data parallel, FSDP2

With no arguments it trains a small Qwen2-architecture model from scratch on a bundled verifiable
task, a walk on a 10-digit dial written step by step (prompt ``7++-?``, completion ``898=8``: the
position after every move, then the final one; the reward checks the final position), and shows
held-out accuracy rising. With ``--model NAME_OR_PATH --dataset gsm8k|math|FILE`` it runs any causal
LM (Qwen, LLaMA, ...). ``--credit NAME`` picks the credit-assignment method from
``creditlib.credit`` (``--help`` lists them); the options of its group override the method's values.

One RL step (``grpo_step`` below; B = K prompts x G completions, T = completion length):

    1. rollout: K prompts, G completions each from the current policy        # tokens, mask [B, T]
       (--tree-roots M: the G leaves of a tree per prompt, creditlib.rl.tree.sample_tree;
        --env NAME: G episodes per prompt against an environment, creditlib.rl.multiturn.rollout_episodes:
        one row per episode, the environment's answers masked, turn ids [B, T], per-turn rewards and
        state ids [B, K])
    2. verifiable rewards R_i (1 if the final answer is right; --env: the environment's)  # [B]
    3. credit stage, creditlib.modules.credit_pipeline(method):
         CriticFreeTD   A_i = (R_i - mean_G R) / (std_G R + 1e-4)             # [B, 1, 1]
      or PrefixTD       per-token prefix-tree TD error, GAE over it           # [B, T, 1]
    or CreditAdvantage turn methods: each turn's advantage on its own tokens  # [B, T, 1]
         EntropySelect  the top-entropy ("forking") tokens of the loss        # bool [B, T]
    4. GRPOLambdaLoss.from_credit(method) (a TorchRL GRPOLoss): A <- max(A, c) (the method's clamp),
       x_t = log pi(o_t) - log pi_old(o_t), z = the method's trace of x (GRPO: z = x),
       L = -agg_t min(e^z_t A, clip(e^z_t) A)                                  # [B, T] -> scalar
    5. backward, gradient clipping, AdamW (creditlib.rl.train.optimizer_step); log, evaluate, checkpoint

Every run gets its own folder, ``runs/<credit>-<task>-<YYYYmmdd-HHMMSS>``, printed at start;
``--output-dir DIR`` names one (a folder holding another run needs ``--resume`` or ``--overwrite``).
Every option: ``--help``; the pipeline: docs/recipes.md.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

if __package__ in (None, ""):  # run as a script from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential
from transformers import PreTrainedTokenizerBase

from creditlib.credit import CreditMethod
from creditlib.losses import GRPOLambdaLoss
from creditlib.modules import credit_pipeline
from creditlib.rl import checkpoint as ckpt
from creditlib.rl.build import build_policy, build_reference, build_rollout, max_new_tokens
from creditlib.rl.config import (CREDIT_OPTIONS, INHERIT, RecipeConfig, config_to_dict, parse_args, resolve_credit,
                                 tree_spec)
from creditlib.rl.data import Example, MathSource, SyntheticSource, build_source
from creditlib.rl.distributed import (DistInfo, all_reduce_dict_mean, barrier, finish, init_distributed,
                                      shard_model)
from creditlib.rl.loop import (TINY_MODEL_PARAMS, StartPoint, StopSignals, choose_threads, clear_run_folder,
                               init_weights,
                               learning_rate, nonfinite_message, read_run_info, run_folder, set_threads,
                               start_point, write_run_info, write_summary)
from creditlib.rl.metrics import MetricsLogger, make_reporter
from creditlib.rl.model import NonFiniteError, completion_logprobs, count_parameters, resolve_device
from creditlib.rl.policy import CompletionPolicy
from creditlib.rl.rewards import SafeReward, reward_for_dataset
from creditlib.rl.env import EnvSpec, get_env
from creditlib.rl.multiturn import EpisodeBatch, evaluate_episodes, rollout_episodes
from creditlib.rl.rollout import HFRollout, RolloutBatch, VLLMRollout
from creditlib.rl.tree import TransformersBackend, TreeRollout, TreeSpec, sample_tree
from creditlib.rl.train import evaluate, evaluate_env, make_optimizer, optimizer_step, sft_warmup

NAME = "GRPO"
DEFAULTS: Dict[str, Any] = {"credit": "grpo"}  # everything else: RecipeConfig's defaults; presets: recipes/configs/*.yaml

RESPONSE, MASK, LOSS_MASK = ("tokens", "response"), ("masks", "response"), ("masks", "loss")  # tensordict keys
ATTENTION = ("masks", "attention")  # multi-turn rows: policy and observation tokens (observations: context only)
TURN_IDS, TURN_REWARDS, STATE_IDS = ("turns", "ids"), ("turns", "rewards"), ("turns", "states")


# ==================================================================== setup
@dataclass
class Recipe:
    """Everything a run holds (built by :func:`setup`)."""

    cfg: RecipeConfig
    name: str
    info: DistInfo
    device: torch.device
    out: Path
    model: torch.nn.Module  # the policy (FSDP2-sharded under torchrun)
    tokenizer: PreTrainedTokenizerBase  # the model's, or the embedded task's character tokenizer (also one)
    source: Union[SyntheticSource, MathSource]  # the prompts, answers and their encoding
    reward: SafeReward
    method: CreditMethod
    credit: TensorDictSequential  # the method's advantage stage (creditlib.modules.credit_pipeline)
    scorer: CompletionPolicy  # the sampling policy's log-probs (and entropies) before the update
    loss_fn: GRPOLambdaLoss
    optimizer: torch.optim.Optimizer
    hf_rollout: HFRollout  # greedy evaluation and the warm-up's validation
    rollout: Union[HFRollout, VLLMRollout]  # RL sampling (a colocated vLLM engine with --rollout vllm)
    heldout: List[Example]
    start: StartPoint
    state: Dict[str, Any]  # the trainer state: a resumed checkpoint's, else filled by warm_up
    logger: MetricsLogger
    samples: MetricsLogger
    n_updates: int
    ref_model: Optional[torch.nn.Module] = None  # frozen reference of the KL term (--kl-coef > 0)
    tree: Optional[TreeSpec] = None  # --tree-roots M > 0: the tree sampled for every prompt (else flat groups)
    tree_backend: Optional[TransformersBackend] = None  # the tree sampler's transformers backend
    env: Optional[EnvSpec] = None  # --env NAME: multi-turn episodes against this environment (else single-turn)
    say: Callable[..., None] = print


def setup(cfg: RecipeConfig, name: str = NAME) -> Recipe:
    """The run folder, model, data, reward, credit stage, loss, optimizer, rollout engine, reference and loggers.

    Every check runs before anything is written to the run folder: a folder holding another run
    without ``--resume`` / ``--overwrite``, an ``--init-from`` inside it or of another model size,
    ``--resume`` of a damaged run or, with ``--kl-coef``, of a run without a reference policy.
    """
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if cfg.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({info.world_size})")
    say = print if info.main else (lambda *a, **k: None)
    out, created = run_folder(cfg, info)  # --output-dir, or a new runs/<credit>-<task>-<time>
    cfg = replace(cfg, output_dir=str(out))
    try:
        return _build(cfg, name, device, info, out, say)
    except BaseException:
        if created and info.main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty folder behind
        raise


def _build(cfg: RecipeConfig, name: str, device: torch.device, info: DistInfo, out: Path, say) -> Recipe:
    say(f"{name}: run folder {out}")
    start = start_point(cfg, say)  # --resume / --init-from / fresh; raises before anything is overwritten
    method = resolve_credit(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tokenizer = build_policy(cfg, device)
    threads, why = choose_threads(count_parameters(model), cfg.num_threads,
                                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if info.enabled else 1)
    say(f"threads: {set_threads(threads)} ({why}; --num-threads N overrides)")
    if start.kind == "init":  # another run's weights (e.g. a shared warm-up), loaded before sharding
        init_weights(start, model)  # CheckpointError when they do not fit (another model size)
    env = get_env(cfg.env) if cfg.env else None
    source = env.build_source(cfg, tokenizer) if env else build_source(cfg, tokenizer)  # --env: its problems
    reward = SafeReward(reward_for_dataset(cfg.dataset), timeout=cfg.reward_timeout)  # single-turn tasks
    model = shard_model(model, info, torch.bfloat16 if device.type == "cuda" and cfg.dtype == "auto" else None)
    model.train()
    heldout = source.heldout(cfg.eval_size)

    K, G = cfg.prompts_per_step // info.world_size, cfg.group_size
    mb = cfg.minibatch_size or K * G
    n_updates = cfg.ppo_epochs * math.ceil(K * G / mb)  # optimizer steps per RL step
    T = max_new_tokens(cfg, source) if env is None else max_turns(cfg, source) * max_turn_tokens(cfg, source)
    # the credit stage: the method's advantage (reward [B, 1, 1] -> advantage [B, 1, 1], or [B, T, 1]
    # for prefix-tree methods) and entropy selection (bool [B, T]); its clamp max(A, c) runs in the
    # loss, which then reports the fraction of advantages it raised (adv_clamped_fraction)
    # turn methods on episodes read the turn ids, per-turn rewards and (anchor-state) the state ids
    turns = env is not None and method.advantage_kind.turns
    credit = credit_pipeline(method.replace(clamp_min=None), group_size=G, reward_key="reward", tokens_key=RESPONSE,
                             mask_key=MASK, select_key=LOSS_MASK, keepdim=True,
                             turn_ids_key=TURN_IDS if turns else None, turn_rewards_key=TURN_REWARDS if turns else None,
                             state_ids_key=STATE_IDS if turns and method.advantage_kind.needs_states else None)
    # TorchRL's GRPOLoss with the method's log-ratio trace and clamp; no entropy bonus; the KL to a
    # frozen reference is GRPOLoss's kl_to_ref; an entropy-selecting method keeps the policy term of
    # the selected tokens only (the aggregation still counts every completion token, as TRL does)
    attention = ATTENTION if env is not None else None  # episodes attend to the observations, never score them
    policy = CompletionPolicy(model, cfg.temperature, on_policy=n_updates == 1, attention_key=attention)
    loss_fn = GRPOLambdaLoss.from_credit(
        method, policy, select_key=LOSS_MASK, clip_epsilon=cfg.clip_eps, aggregation=cfg.aggregation,
        loss_scale_factor=T if cfg.aggregation == "seq-mean-token-sum-norm" else None, entropy_bonus=False,
        kl_to_ref_coeff=cfg.kl_coef if cfg.kl_coef > 0 else None)
    loss_fn.set_keys(action=RESPONSE, sample_log_prob=("log_probs", "response"),
                     ref_log_probs=("ref_log_probs", "response"))
    scorer = CompletionPolicy(model, cfg.temperature, entropy=method.needs_entropy, attention_key=attention)
    optimizer = make_optimizer(model, cfg)
    tree = tree_spec(cfg)  # None: flat groups (cfg.validate checked the shape against group_size)
    tree_backend = None if tree is None else TransformersBackend(model, tokenizer, temperature=cfg.temperature,
                                                                 synced=info.enabled)

    state: Dict[str, Any] = {}
    ref_model = None
    if start.kind == "resume":  # model, optimizer, RNG, step and data position of this run's checkpoint
        state = ckpt.load_checkpoint(start.path, model, optimizer, info)
        if cfg.kl_coef > 0:  # the reference the run started with (start_point checked that it exists)
            ref_model = build_reference(cfg, device, ckpt.load_weights(out / "reference.safetensors"), info)
    hf_rollout = build_rollout(replace(cfg, rollout="hf"), model, tokenizer, source, info)
    rollout = hf_rollout if cfg.rollout == "hf" else build_rollout(  # a colocated vLLM engine with these weights
        cfg, model, tokenizer, source, info, sync=ckpt.model_state_dict(model, info, every_rank=True))

    # ---- the run folder: only now is anything written to it
    if info.main:
        if cfg.overwrite:
            gone = clear_run_folder(out)
            if gone:
                say(f"--overwrite: deleted the previous run's {', '.join(gone)} in {out}")
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    run_id = read_run_info(out).get("wandb_run_id") if start.kind == "resume" else None  # one W&B run per run
    reporter = make_reporter(cfg.report_to, out, config_to_dict(cfg), name=f"{name} {cfg.credit} {out.name}",
                             resume_step=start.resume_step, run_id=run_id) if info.main else None
    if info.main:
        write_run_info(out, name=name, credit=cfg.credit, dataset=cfg.dataset,
                       **({"wandb_run_id": reporter.run_id} if cfg.report_to == "wandb" else {}))
    logger = MetricsLogger(out / "metrics.jsonl", resume_step=start.resume_step, enabled=info.main, reporter=reporter)
    samples = MetricsLogger(out / "samples.jsonl", resume_step=start.resume_step, enabled=info.main)
    over = {k: getattr(cfg, k) for k in CREDIT_OPTIONS if getattr(cfg, k) != INHERIT}  # the overridden values
    say(f"{name}: {count_parameters(model):,}-parameter {type(model).__name__} on {device} (x{info.world_size}), "
        + (f"environment {cfg.env!r}" if env else f"dataset {cfg.dataset!r}") + f", {len(heldout)} held-out prompts -> {out}\n"
        f"credit {cfg.credit}{f' with {over}' if over else ''}: {method.summary()}\n"
        f"rollout: {_rollout_summary(cfg, tree, source, _pipelined(cfg, tree, tree_backend, model))}")
    if start.kind == "resume":
        say(f"resumed from {start.path} (RL step {state['step']}, data position {state['position']})")
    return Recipe(cfg=cfg, name=name, info=info, device=device, out=out, model=model, tokenizer=tokenizer,
                  source=source, reward=reward, method=method, credit=credit, scorer=scorer, loss_fn=loss_fn,
                  optimizer=optimizer, hf_rollout=hf_rollout, rollout=rollout, heldout=heldout, start=start,
                  state=state, logger=logger, samples=samples, n_updates=n_updates, ref_model=ref_model,
                  tree=tree, tree_backend=tree_backend, env=env, say=say)


def max_turns(cfg: RecipeConfig, source) -> int:
    """``--max-turns``, or the environment's own turn limit (its source's ``max_turns``)."""
    return cfg.max_turns or source.max_turns


def max_turn_tokens(cfg: RecipeConfig, source) -> int:
    """``--max-turn-tokens``, or what one turn of the environment needs (its source's ``max_turn_tokens``)."""
    return cfg.max_turn_tokens or source.max_turn_tokens


def tree_pipelined(cfg: RecipeConfig, tree: TreeSpec, backend: TransformersBackend, n_params: int) -> bool:
    """``--tree-pipeline``: fork while the parent decodes (exactly the same trees, one decode pass).
    ``auto``: segment trees always; entropy / uniform trees (speculative forks, some branch rows
    dropped) on models of at least ``TINY_MODEL_PARAMS`` parameters, whose decode steps cost about
    the same whatever the rows. Needs the backend's own decode loop (not ``synced`` FSDP)."""
    if cfg.tree_pipeline == "off" or backend.decode != "loop":
        return False
    return cfg.tree_pipeline == "on" or tree.select == "segment" or n_params >= TINY_MODEL_PARAMS


def _pipelined(cfg: RecipeConfig, tree: Optional[TreeSpec], backend, model) -> Optional[bool]:
    return None if tree is None else tree_pipelined(cfg, tree, backend, count_parameters(model))


def _rollout_summary(cfg: RecipeConfig, tree: Optional[TreeSpec], source=None, pipelined=None) -> str:
    if cfg.env:
        return (f"{cfg.group_size} episodes per prompt against --env {cfg.env} (at most {max_turns(cfg, source)} turns "
                f"of {max_turn_tokens(cfg, source)} tokens; environment answers masked"
                + (f"; process reward x {cfg.process_coef:g}" if cfg.process_coef else "") + ")")
    if tree is None:
        return f"{cfg.group_size} independent completions per prompt ({cfg.rollout})"
    return (f"a tree of {tree.leaves} leaves per prompt: {tree.roots} root(s), {tree.depth} round(s) of {tree.forks} "
            f"fork(s) x {tree.branches} branch(es) at {tree.select} positions (min gap {tree.min_gap}"
            + (f", segment {tree.segment_len}" if tree.select == "segment" else "")
            + (", forks while the parent decodes" if pipelined is True else "") + ")")


# ==================================================================== one rollout
#: per-step rollout counts summed over ranks (the rest of the rollout metrics are averaged)
SUMMED = ("rows", "generated_tokens", "row_tokens", "fallback_relaxed_gap", "fallback_at_own_fork", "episodes",
          "failed_episodes", "truncated_episodes", "pipeline_spawned_rows", "pipeline_dropped_rows",
          "pipeline_dropped_tokens", "pipeline_late_spawns")


def tree_seed(seed: int, step: int, rank: int) -> int:
    """The tree sampler's seed of one RL step on one rank (a resumed run draws the same trees)."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def sample_rollout(r: Recipe, examples: List[Example], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   step: int) -> Tuple[Union[RolloutBatch, TreeRollout, EpisodeBatch], Dict[str, float]]:
    """``K`` prompts ``[K, P]`` -> ``B = K x G`` rows (rows ``[k G, (k + 1) G)`` share prompt ``k``) and
    the rollout's counts: ``rows``, ``generated_tokens`` (sampled by the engine; a token shared by
    the leaves of a tree counts once), ``row_tokens`` (what the update trains on) and, for a tree,
    its shape (``token_ratio``, ``fork_pos_mean``, ``fallback_*``: :meth:`TreeRollout.summary`); for
    episodes (``--env``), :meth:`EpisodeBatch.summary` (``failed_episodes``, ``mean_turns``, ...)."""
    G = r.cfg.group_size
    if r.env is not None:  # G episodes per example; the environment reads the example, not the prompt ids
        batch = rollout_episodes(r.model, r.tokenizer, r.source.make_env, examples, G,
                                 max_turns=max_turns(r.cfg, r.source), max_turn_tokens=max_turn_tokens(r.cfg, r.source),
                                 temperature=r.cfg.temperature, timeout=r.cfg.env_timeout,
                                 process_reward=r.env.process_reward if r.cfg.process_coef else None,
                                 process_coef=r.cfg.process_coef, device=r.device,
                                 add_special_tokens=r.source.add_special_tokens)  # [B, T] rows, [B, K] turns
        return batch, {"rows": float(batch.batch_size), **batch.summary()}
    if r.tree is None:
        batch = r.rollout.rollout(prompt_ids, prompt_mask, G)  # completion ids / mask [B, T]
        n = float(batch.completion_mask.sum())
        return batch, {"rows": float(batch.batch_size), "generated_tokens": n, "row_tokens": n}
    # forks join the decode batch while their parent decodes (one pass, the same trees): --tree-pipeline
    pipeline = tree_pipelined(r.cfg, r.tree, r.tree_backend, count_parameters(r.model))
    tree = sample_tree(r.tree_backend, prompt_ids, prompt_mask, r.tree, max_new_tokens=max_new_tokens(r.cfg, r.source),
                       seed=tree_seed(r.cfg.seed, step, r.info.rank), group_size=G, tokenizer=r.tokenizer,
                       pipeline=pipeline)
    dev = r.device
    tree = replace(tree, prompt_ids=tree.prompt_ids.to(dev), prompt_mask=tree.prompt_mask.to(dev),  # [B, P]
                   completion_ids=tree.completion_ids.to(dev), completion_mask=tree.completion_mask.to(dev))  # [B, T]
    counts = {k: float(v) for k, v in tree.summary().items()}
    counts.update({f"pipeline_{k}": float(v) for k, v in tree.pipeline_stats.items()})  # speculative rows dropped, ...
    return tree, counts


# ==================================================================== one RL step
def grpo_step(r: Recipe, batch, rewards: torch.Tensor) -> Dict[str, float]:
    """One GRPO update on ``B = K x G`` completions: credit stage, then PPO epochs over minibatches.

    Episodes (``--env``): ``rewards`` is the outcome; a turn method also reads the per-turn rewards
    and state ids (each turn's advantage on its own tokens), any other method the episode's total
    reward (outcome + per-turn rewards); the model attends to the observations, which are never scored.

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
    attention = None
    if isinstance(batch, EpisodeBatch):
        attention = batch.attention_mask  # [B, T] policy and observation tokens
        td[ATTENTION] = attention
        if r.method.advantage_kind.turns:  # each turn's own reward and (anchor-state) state
            td[TURN_IDS], td[TURN_REWARDS], td[STATE_IDS] = batch.turn_ids, batch.turn_rewards, batch.state_ids
        else:  # a trajectory-level method judges the episode's total reward
            td["reward"] = batch.total_rewards().to(r.device).reshape(B, 1, 1)  # [B, 1, 1]
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
                r.ref_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.temperature,
                attention_mask=attention)  # [B, T]
    td = r.credit(td)  # advantage [B, 1, 1] or [B, T, 1] (+ the loss mask [B, T])

    sums: Dict[str, float] = {}
    n_mb = math.ceil(B / mb)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B) if n_mb > 1 else torch.arange(B)  # [B]
        for i in range(0, B, mb):
            sub = td if n_mb == 1 else td[perm[i:i + mb].to(r.device)]  # [b]
            out = r.loss_fn(sub)  # PPO-clipped surrogate over the (traced) ratio, aggregated to a scalar
            loss = out.loss_objective + (out.loss_kl_to_ref if cfg.kl_coef > 0 else 0.0)
            gnorm = optimizer_step(r.model, r.optimizer, loss, r.info, cfg.max_grad_norm)  # finite checks, clip, step
            m = {"loss": float(loss.detach()), "loss_policy": float(out.loss_objective.detach()),
                 "grad_norm": float(gnorm), "traced_clip_fraction": float(out.traced_clip_fraction),
                 "trace_abs_mean": float(out.trace_abs_mean), "approx_kl": float(out.kl_approx),
                 "ess": float(out.ESS), "adv_clamped_fraction": float(out.adv_clamped_fraction)}
            if cfg.kl_coef > 0:
                m["kl_to_ref"] = float(out.kl_to_ref)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / r.n_updates
    r.optimizer.zero_grad(set_to_none=True)
    sums["num_tokens"] = float(mask.sum())
    selected = td.get(LOSS_MASK) if r.method.needs_entropy else mask  # [B, T] tokens with a policy term
    sums["loss_tokens_fraction"] = float(selected.sum()) / max(1.0, sums["num_tokens"])
    return sums


# ==================================================================== train: warm-up -> RL -> evaluation
def held_out(r: Recipe, examples: List[Example], engine=None, samples: int = 0, log_samples: int = 0) -> Dict:
    """Greedy ``accuracy`` (and ``sampled_accuracy`` with ``samples``) on ``examples``: completions
    scored by the reward, or (``--env``) episodes, whose success is the accuracy."""
    if r.env is None:
        return evaluate(engine or r.hf_rollout, r.source, examples, r.reward, r.info, r.device, samples=samples,
                        log_samples=log_samples)
    return evaluate_env(r.model, r.tokenizer, r.source, examples, r.info, r.device, max_turns=max_turns(r.cfg, r.source),
                        max_turn_tokens=max_turn_tokens(r.cfg, r.source), timeout=r.cfg.env_timeout,
                        temperature=r.cfg.temperature, samples=samples, log_samples=log_samples)


def evaluate_and_log(r: Recipe, engine, step: int, generated_tokens: float = 0.0) -> Dict:
    """Held-out greedy (and sampled) accuracy; a few completions to samples.jsonl. ``generated_tokens``:
    the RL rollouts' tokens so far (accuracy against tokens as well as steps)."""
    cfg = r.cfg
    res = held_out(r, r.heldout, engine, samples=cfg.eval_samples, log_samples=cfg.log_samples)
    rec = {"phase": "eval", "step": step, "accuracy": res["accuracy"], "generated_tokens": generated_tokens}
    rec.update({k: v for k, v in res.items() if k not in ("accuracy", "samples")})
    r.logger.log(rec)
    for s in res["samples"]:
        r.samples.log({"phase": "eval", "step": step, **s})
    return res


def warm_up(r: Recipe) -> Dict:
    """A new run (fresh or ``--init-from``): evaluate, supervised warm-up (fresh only), evaluate;
    then the reference policy (``--kl-coef``: the RL starting point) and checkpoint 0."""
    cfg, info = r.cfg, r.info
    torch.manual_seed(cfg.seed + 1000 * info.rank + 1)  # per-rank sampling streams
    t0 = time.time()
    if r.start.kind == "init":
        acc_init, sft = r.start.state.get("acc_init"), {"sft_steps": 0, "position": r.start.state.get("position", 0)}
        r.say(f"--init-from {r.start.path}: its weights, a fresh optimizer, RL step 0, data position {sft['position']}")
    else:
        acc_init = held_out(r, r.heldout)["accuracy"]
        r.logger.log({"phase": "sft", "step": 0, "val_accuracy": None, "heldout_accuracy": acc_init})
        sft = {"sft_steps": 0, "position": 0}
        if cfg.sft_steps:
            val = r.source.validation(256)
            validate = lambda: held_out(r, val)["accuracy"]  # noqa: E731
            sft = sft_warmup(r.model, r.source, cfg, info, r.device, validate, r.logger.log, cfg.progress, say=r.say)
            if r.rollout is not r.hf_rollout:  # the vLLM engine samples with the warmed-up weights
                r.rollout.sync_weights(ckpt.model_state_dict(r.model, info, every_rank=True))
    before = evaluate_and_log(r, r.hf_rollout, 0)
    state = {"step": 0, "position": sft["position"], "acc_init": acc_init, "acc_before": before["accuracy"],
             "sampled_before": before.get("sampled_accuracy"), "sft_steps": sft["sft_steps"], "generated_tokens": 0.0,
             "sft_seconds": time.time() - t0, "rl_seconds": 0.0,
             "init_from": str(r.start.path) if r.start.kind == "init" else None}
    if cfg.kl_coef > 0:  # the reference policy = the RL starting point, kept for --resume
        ref_sd = ckpt.model_state_dict(r.model, info)
        if info.main:
            ckpt.save_weights(ref_sd, r.out / "reference.safetensors")
        barrier(info)
        r.ref_model = build_reference(cfg, r.device, ckpt.load_weights(r.out / "reference.safetensors"), info)
    r.optimizer = make_optimizer(r.model, cfg)  # fresh: the warm-up's steps are not RL steps
    ckpt.save_checkpoint(r.out, 0, r.model, r.optimizer, state, info, keep=cfg.keep_checkpoints + 1)
    return state


def rl_loop(r: Recipe, state: Dict) -> Dict:
    """RL steps ``state["step"] + 1 .. max_steps``; returns the last evaluation and how the loop ended."""
    from tqdm.auto import tqdm

    cfg, info, out, G = r.cfg, r.info, r.out, r.cfg.group_size
    step, position, last_saved = state["step"], state["position"], state["step"]
    tokens = float(state.get("generated_tokens", 0.0))  # RL rollout tokens so far, all ranks
    failed = float(state.get("failed_episodes", 0.0))  # --env: episodes the environment failed (error / hang)
    acc = {"accuracy": state.get("acc_last", state["acc_before"]),
           "sampled_accuracy": state.get("sampled_last", state.get("sampled_before"))}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{r.name} ({cfg.credit})",
               disable=not (cfg.progress and info.main), dynamic_ncols=True)
    t_rl = time.time() - state.get("rl_seconds", 0.0)

    def save(step):
        state.update(step=step, position=position, acc_last=acc["accuracy"], sampled_last=acc.get("sampled_accuracy"),
                     rl_seconds=time.time() - t_rl, generated_tokens=tokens, failed_episodes=failed)
        ckpt.save_checkpoint(out, step, r.model, r.optimizer, state, info, keep=cfg.keep_checkpoints)

    exit_code = 0
    with StopSignals() as stop:  # SIGTERM / SIGINT: finish the step, checkpoint, exit
        try:
            while step < cfg.max_steps and not stop.any_rank(info):
                step += 1
                t0 = time.time()
                # 1. sample K prompts, G completions each (flat, or the leaves of a tree) from the current policy
                prompts, position = r.source.next_batch(position, cfg.prompts_per_step)  # global batch
                mine = prompts[info.rank::info.world_size]  # this rank's K prompts
                prompt_ids, prompt_mask = r.source.encode(mine, r.device)  # [K, P]
                batch, shape = sample_rollout(r, mine, prompt_ids, prompt_mask, step)  # B = K*G: ids/mask [B, T]
                # 2. verifiable rewards (--env: the environment's, already in the episodes)
                if isinstance(batch, EpisodeBatch):
                    rewards, rstats = batch.rewards, {}  # [B] outcome; per-turn rewards in batch.turn_rewards
                else:
                    rewards, rstats = r.reward(batch.texts, [e.answer for e in mine for _ in range(G)])  # [B]
                # 3-4. credit stage + PPO update
                lr = learning_rate(cfg, step)
                for group in r.optimizer.param_groups:
                    group["lr"] = lr
                m = grpo_step(r, batch, rewards)
                if r.rollout is not r.hf_rollout:
                    r.rollout.sync_weights(ckpt.model_state_dict(r.model, info, every_rank=True))
                # 5. log, evaluate, checkpoint
                total = batch.total_rewards() if isinstance(batch, EpisodeBatch) else rewards  # [B]
                m.update(reward=float(total.mean()), completion_len=float(batch.completion_mask.sum(-1).float().mean()),
                         **rstats, **shape)
                m = all_reduce_dict_mean(m, info)
                m.update({k: m[k] * info.world_size for k in SUMMED if k in m})  # counts: all ranks together
                tokens += m["generated_tokens"]
                m["generated_tokens_total"] = tokens
                if m.get("failed_episodes"):  # the environment raised or hung: those episodes got reward 0
                    failed += m["failed_episodes"]
                    first = next((e for e in getattr(batch, "errors", []) if e), "(on another rank)")
                    bar.write(f"step {step}: {m['failed_episodes']:.0f} episode(s) failed and got reward 0 "
                              f"({failed:.0f} so far); first error: {first}")
                m.update(phase="rl", step=step, position=position, lr=lr, step_seconds=time.time() - t0)
                r.logger.log(m)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    acc = evaluate_and_log(r, r.rollout, step, tokens)
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
    return {"step": step, "acc": acc, "t_rl": t_rl, "exit_code": exit_code, "generated_tokens": tokens,
            "failed_episodes": failed}


def finish_run(r: Recipe, state: Dict, end: Dict, t_start: float) -> Dict:
    """The final model, plot and summary table (main rank); the process group torn down."""
    cfg, info, out = r.cfg, r.info, r.out
    if end["exit_code"]:
        r.logger.close()
        finish(info, end["exit_code"])
        raise SystemExit(end["exit_code"])
    acc, step = end["acc"], end["step"]
    full_sd = ckpt.model_state_dict(r.model, info)
    summary = {"accuracy_initial": state.get("acc_init"), "accuracy_before": state["acc_before"],
               "accuracy_after": acc["accuracy"], "sampled_accuracy_after": acc.get("sampled_accuracy"),
               "steps": step, "credit": cfg.credit, "output_dir": str(out), "wall_seconds": time.time() - t_start,
               "generated_tokens": end["generated_tokens"], "tree": None if r.tree is None else r.tree.leaves,
               "env": cfg.env or None, "failed_episodes": end["failed_episodes"]}
    if info.main:
        rows = [("credit method", r.method.summary()),
                ("rollout", _rollout_summary(cfg, r.tree, r.source, _pipelined(cfg, r.tree, r.tree_backend, r.model))),
                ("generated tokens (RL rollouts)", f"{end['generated_tokens']:,.0f}")]
        if r.env is not None:
            rows.append(("failed episodes (environment error or hang; reward 0)", f"{end['failed_episodes']:.0f}"))
        table, png = write_summary(r.name, cfg, out, r.model, r.tokenizer, full_sd, state, acc, step, r.reward,
                                   t_start, end["t_rl"], len(r.heldout), rows)
        print("\n" + table)
        summary["plot"] = str(png) if png else None
    r.logger.close()
    finish(info, 0)
    return summary


def train(r: Recipe) -> Dict:
    """Warm-up (a new run) -> RL loop -> finish. Exits non-zero on a NaN stop or a signal."""
    t_start = time.time()
    state = r.state if r.start.kind == "resume" else warm_up(r)
    end = rl_loop(r, state)
    return finish_run(r, state, end, t_start)


def main(argv=None) -> dict:
    """Run the recipe on a command line (``sys.argv[1:]`` when ``None``; ``--config FILE.yaml`` for a
    preset); returns a summary dict (accuracies, paths). Exits non-zero on a NaN stop or a signal."""
    cfg = parse_args(argv, defaults=DEFAULTS, description=__doc__)
    try:
        r = setup(cfg)
    except (ckpt.CheckpointError, ValueError) as e:  # a damaged run to resume, a bad --init-from: say it, write nothing
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    return train(r)


if __name__ == "__main__":
    main()
