"""The training pieces of the recipes: supervised warm-up, the GRPO(-lambda) update, evaluation.

The update (:func:`rl_update`) is the loss step of the paper's algorithm box::

    for each of ppo_epochs, for each minibatch of the B = K x G completions:
        logp      = log pi_theta(o_t | q, o_<t)                         # [b, T]
        loss      = grpo_lambda_loss(logp, old_logp, A, mask, style,    # trace over log-ratios,
                                     clip_eps, clamp_min, aggregation,  # clamp, PPO clip,
                                     ref_logp, kl_coef)                 # optional KL
        check finite -> backward -> clip grad norm -> check finite -> optimizer step

It never takes an optimizer step on a NaN/inf loss or gradient (it raises :class:`NonFiniteError`
first), so the weights and the optimizer state stay those of the last good step.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from ..losses.functional import grpo_lambda_loss
from ..style import DecayStyle
from .distributed import DistInfo, all_reduce_sum, reshard
from .model import NonFiniteError, completion_logprobs
from .rollout import RolloutBatch

__all__ = ["make_optimizer", "rl_update", "sft_warmup", "evaluate_accuracy", "make_style", "NonFiniteError"]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over the policy's (sharded) parameters."""
    reshard(model)  # FSDP2: a forward without backward leaves the root's parameters unsharded
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_style(cfg) -> Optional[DecayStyle]:
    """The trace style of a config; ``None`` (plain GRPO) when the trace is the identity (``lam = 0``)."""
    style = DecayStyle(cfg.trace_style, gamma=cfg.gamma, lam=cfg.lam, eps=cfg.trace_eps)
    return None if style.is_identity() else style


def _all_finite(x: torch.Tensor, info: DistInfo) -> bool:
    """True on every rank iff ``x`` is finite on every rank (so all ranks stop together)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(x).all()) else 1.0])
    return float(all_reduce_sum(bad, info)) == 0.0


def _grad_norm(model, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm.detach().float().cpu()


def rl_update(model, optimizer, batch: RolloutBatch, advantages: torch.Tensor, cfg, info: DistInfo,
              style: Optional[DecayStyle], ref_model=None) -> Dict[str, float]:
    """One RL update on a rollout batch; returns averaged metrics (floats).

    Args:
        model: the policy (plain or FSDP2-sharded), in train mode.
        optimizer: its optimizer.
        batch: ``B`` completions (:class:`RolloutBatch`).
        advantages: ``[B]`` group-relative advantages (the critic-free TD error of every token).
        cfg: a :class:`~creditlib.rl.config.RecipeConfig` (clip_eps, clamp_min, aggregation, kl_coef,
            ppo_epochs, minibatch_size, max_grad_norm, temperature).
        info: distributed info (finite checks agree across ranks).
        style: trace style, ``None`` for plain GRPO.
        ref_model: frozen reference policy for the KL term (``cfg.kl_coef > 0``).
    Raises:
        NonFiniteError: NaN/inf loss or gradient norm (no optimizer step was taken).
    """
    B = batch.batch_size
    mb = cfg.minibatch_size or B
    n_mb = math.ceil(B / mb)
    n_updates = cfg.ppo_epochs * n_mb
    temp = cfg.temperature
    mask = batch.completion_mask  # [B, T]
    old_logp = None
    if n_updates > 1:  # the sampling policy's log-probs, before any update
        with torch.no_grad():
            old_logp = torch.cat([completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids,
                                                      s.completion_mask, temp)
                                  for s in (batch.select(torch.arange(i, min(i + mb, B))) for i in range(0, B, mb))])
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad():
            ref_logp = completion_logprobs(ref_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                           mask, temp)  # [B, T]
    sums: Dict[str, float] = {}
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B) if n_mb > 1 else torch.arange(B)  # [B]
        for i in range(0, B, mb):
            idx = perm[i:i + mb]  # [b]
            sub = batch.select(idx.to(batch.completion_ids.device))
            logp = completion_logprobs(model, sub.prompt_ids, sub.prompt_mask, sub.completion_ids,
                                       sub.completion_mask, temp)  # [b, T] carries the gradient
            old = logp.detach() if old_logp is None else old_logp[idx]  # [b, T]
            loss, m = grpo_lambda_loss(
                logp, old, advantages[idx].to(logp.device), sub.completion_mask, style,
                clip_eps=cfg.clip_eps, clamp_min=cfg.clamp_min, aggregation=cfg.aggregation,
                ref_logp=None if ref_logp is None else ref_logp[idx], kl_coef=cfg.kl_coef)
            if not _all_finite(loss.detach().cpu(), info):
                raise NonFiniteError(f"the RL loss is {float(loss.detach()):.4g} (NaN/inf); no update was applied")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = _grad_norm(model, cfg.max_grad_norm)
            if not _all_finite(gnorm, info):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"the gradient norm is {float(gnorm):.4g} (NaN/inf); no update was applied")
            optimizer.step()
            m = {k: float(v) for k, v in m.items()}
            m["loss"] = float(loss.detach())
            m["grad_norm"] = float(gnorm)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / n_updates
    optimizer.zero_grad(set_to_none=True)
    return sums


def sft_warmup(model, source, cfg, info: DistInfo, device: torch.device,
               validate: Callable[[], float], log: Callable[[Dict], None], progress: bool = True) -> Dict:
    """Supervised warm-up: cross-entropy on worked solutions until validation accuracy reaches
    ``cfg.sft_target_accuracy`` (checked every ``cfg.sft_eval_every`` steps) or ``cfg.sft_steps``.

    Stopping at a target accuracy leaves the same headroom for RL whatever the seed.
    Returns ``{"sft_steps", "sft_val_accuracy", "position"}`` (position: next training example).
    """
    from tqdm.auto import tqdm

    reshard(model)  # FSDP2: the optimizer must hold the sharded parameters (evaluation leaves the root unsharded)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    pos, acc, step = 0, float("nan"), 0
    bar = tqdm(total=cfg.sft_steps, desc="SFT warm-up", disable=not (progress and info.main), dynamic_ncols=True)
    for step in range(1, cfg.sft_steps + 1):
        exs, pos = source.next_batch(pos, cfg.sft_batch_size)  # global batch
        ids, attn, labels = source.encode_sft(exs[info.rank::info.world_size], device)  # [b, L] each
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        if not _all_finite(loss.detach().cpu(), info):
            raise NonFiniteError(f"the warm-up loss is {float(loss.detach()):.4g} (NaN/inf)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _grad_norm(model, 1.0)
        opt.step()
        rec = {"phase": "sft", "step": step, "loss": float(loss.detach())}
        bar.update(1)
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_steps:
            acc = validate()
            rec["val_accuracy"] = acc
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_acc=f"{acc:.2f}")
            if cfg.sft_target_accuracy > 0 and acc >= cfg.sft_target_accuracy:
                log(rec)
                break
        log(rec)
    bar.close()
    del opt
    return {"sft_steps": step, "sft_val_accuracy": acc, "position": pos}


@torch.no_grad()
def evaluate_accuracy(rollout, source, examples: List, reward, info: DistInfo, device: torch.device,
                      batch_size: int = 256) -> float:
    """Greedy-decoding accuracy (mean reward) on held-out ``examples``, split across ranks.

    Every rank runs the same number of generate calls (FSDP needs it): the example count is cut to
    a multiple of the world size.
    """
    n = len(examples) - len(examples) % info.world_size
    if n == 0:
        raise ValueError(f"need at least {info.world_size} held-out examples, got {len(examples)}")
    mine = examples[info.rank:n:info.world_size]
    total = torch.zeros(1, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        ids, mask = source.encode(chunk, device)  # [k, P]
        out = rollout.rollout(ids, mask, 1, greedy=True)
        r, _ = reward(out.texts, [e.answer for e in chunk])  # [k]
        total += float(r.sum())
    return float(all_reduce_sum(total, info)) / n
