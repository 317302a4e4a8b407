"""The training pieces of the recipes: supervised warm-up, evaluation, and a plain-tensor GRPO(-lambda) update.

The recipes' own update (``grpo_step`` in ``recipes/grpo.py``) is built from the TensorDict credit
modules and :class:`creditlib.losses.GRPOLambdaLoss`; it uses :func:`optimizer_step` from here.
:func:`rl_update` is the same update on plain tensors
(:func:`creditlib.losses.grpo_lambda_loss`), for loops that do not use TensorDict::

    for each of ppo_epochs, for each minibatch of the B = K x G completions:
        logp      = log pi_theta(o_t | q, o_<t)                         # [b, T]
        loss      = grpo_lambda_loss(logp, old_logp, A, mask, style,    # trace over log-ratios,
                                     clip_eps, clamp_min, aggregation,  # clamp, PPO clip,
                                     ref_logp, kl_coef)                 # optional KL
        check finite -> backward -> clip grad norm -> check finite -> optimizer step

Neither takes an optimizer step on a NaN/inf loss or gradient (they raise :class:`NonFiniteError`
first, in :func:`optimizer_step`, the one backward / clip / step sequence of the recipe, the
warm-up and :func:`rl_update`), so the weights and the optimizer state stay those of the last good step.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from ..losses.functional import grpo_lambda_loss
from ..style import DecayStyle
from .config import resolve_credit
from .distributed import DistInfo, all_reduce_sum, reshard
from .model import NonFiniteError, completion_logprobs
from .rollout import RolloutBatch

__all__ = ["make_optimizer", "optimizer_step", "rl_update", "sft_warmup", "evaluate", "evaluate_accuracy", "make_style", "all_finite",
           "clip_grad_norm", "NonFiniteError"]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over the policy's (sharded) parameters."""
    reshard(model)  # FSDP2: a forward without backward leaves the root's parameters unsharded
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_style(cfg) -> Optional[DecayStyle]:
    """The loss-side trace style of a config (``--credit`` with its overrides, see
    :func:`~creditlib.rl.config.resolve_credit`); ``None`` (plain token ratio) when there is none
    or it is the identity (``lam = 0``)."""
    style = resolve_credit(cfg).trace
    return None if style is None or style.is_identity() else style


def all_finite(x: torch.Tensor, info: DistInfo) -> bool:
    """True on every rank iff ``x`` is finite on every rank (so all ranks stop together)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(x).all()) else 1.0])
    return float(all_reduce_sum(bad, info)) == 0.0


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the gradients to ``max_norm`` (0 = no clipping); return the pre-clip total norm (float32, CPU)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm.detach().float().cpu()


def optimizer_step(model, optimizer: torch.optim.Optimizer, loss: torch.Tensor, info: DistInfo,
                   max_grad_norm: float = 1.0, what: str = "the RL loss") -> torch.Tensor:
    """The one update sequence of every loop here: check the loss finite -> backward -> clip the
    gradient norm -> check it finite -> optimizer step. Returns the pre-clip gradient norm (float32, CPU).

    Raises :class:`NonFiniteError` (``what`` names the loss) before stepping on a NaN/inf loss or
    gradient norm, with the gradients cleared: the weights and the optimizer state stay those of
    the last good step. The finite checks agree across ranks, so all ranks stop together.
    """
    if not all_finite(loss.detach().cpu(), info):
        raise NonFiniteError(f"{what} is {float(loss.detach()):.4g} (NaN/inf); no update was applied")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = clip_grad_norm(model, max_grad_norm)
    if not all_finite(gnorm, info):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {float(gnorm):.4g} (NaN/inf); no update was applied")
    optimizer.step()
    return gnorm


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
    clamp_min = resolve_credit(cfg).clamp_min
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
                clip_eps=cfg.clip_eps, clamp_min=clamp_min, aggregation=cfg.aggregation,
                ref_logp=None if ref_logp is None else ref_logp[idx], kl_coef=cfg.kl_coef)
            gnorm = optimizer_step(model, optimizer, loss, info, cfg.max_grad_norm)
            m = {k: float(v) for k, v in m.items()}
            m["loss"] = float(loss.detach())
            m["grad_norm"] = float(gnorm)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / n_updates
    optimizer.zero_grad(set_to_none=True)
    return sums


def sft_warmup(model, source, cfg, info: DistInfo, device: torch.device,
               validate: Callable[[], float], log: Callable[[Dict], None], progress: bool = True,
               say: Optional[Callable[[str], None]] = None) -> Dict:
    """Supervised warm-up: cross-entropy on worked solutions until validation accuracy reaches
    ``cfg.sft_target_accuracy`` (checked every ``cfg.sft_eval_every`` steps) or ``cfg.sft_steps``.

    Stopping at a target accuracy leaves the same headroom for RL whatever the seed; ``say`` (the
    main rank's ``print``) announces where and why the warm-up stopped.
    Returns ``{"sft_steps", "sft_val_accuracy", "position", "reached_target"}`` (position: next
    training example).
    """
    from tqdm.auto import tqdm

    reshard(model)  # FSDP2: the optimizer must hold the sharded parameters (evaluation leaves the root unsharded)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    pos, acc, step, reached = 0, float("nan"), 0, False
    bar = tqdm(total=cfg.sft_steps, desc="SFT warm-up", disable=not (progress and info.main), dynamic_ncols=True)
    for step in range(1, cfg.sft_steps + 1):
        exs, pos = source.next_batch(pos, cfg.sft_batch_size)  # global batch
        ids, attn, labels = source.encode_sft(exs[info.rank::info.world_size], device)  # [b, L] each
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        optimizer_step(model, opt, loss, info, 1.0, what="the warm-up loss")
        rec = {"phase": "sft", "step": step, "loss": float(loss.detach())}
        bar.update(1)
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_steps:
            acc = validate()
            rec["val_accuracy"] = acc
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_acc=f"{acc:.2f}")
            if cfg.sft_target_accuracy > 0 and acc >= cfg.sft_target_accuracy:
                reached = True
                log(rec)
                break
        log(rec)
    if reached:  # the bar would stop at "12% 50/400" and look broken: end it at this step
        bar.total = step
        bar.refresh()
    bar.close()
    del opt
    if say is not None:
        if reached:
            say(f"SFT warm-up: validation accuracy {acc:.3f} reached the target {cfg.sft_target_accuracy:g} at step "
                f"{step} (of at most {cfg.sft_steps}); warm-up done")
        else:
            say(f"SFT warm-up: {step} steps, validation accuracy {acc:.3f}"
                + (f" (target {cfg.sft_target_accuracy:g} not reached)" if cfg.sft_target_accuracy > 0 else ""))
    return {"sft_steps": step, "sft_val_accuracy": acc, "position": pos, "reached_target": reached}


@torch.no_grad()
def evaluate(rollout, source, examples: List, reward, info: DistInfo, device: torch.device, *, samples: int = 0,
             log_samples: int = 0, batch_size: int = 256) -> Dict:
    """Held-out evaluation: greedy accuracy and, with ``samples = k > 0``, sampled accuracy.

    Greedy decoding gives ``accuracy`` (mean reward over the examples). With ``k > 0`` the rollout's
    own sampling (its temperature / top-p) draws ``k`` completions per example; ``sampled_accuracy``
    is their mean reward (the expected accuracy of one sample) and ``pass_at_k`` the fraction of
    examples with at least one right sample. ``samples`` lists the first ``log_samples`` examples of
    the main rank as ``{"kind": "greedy"|"sampled", "prompt", "completion", "answer", "reward"}``
    dicts (for ``samples.jsonl``).

    Every rank runs the same number of generate calls (FSDP needs it): the example count is cut to
    a multiple of the world size.
    """
    n = len(examples) - len(examples) % info.world_size
    if n == 0:
        raise ValueError(f"need at least {info.world_size} held-out examples, got {len(examples)}")
    mine = examples[info.rank:n:info.world_size]
    totals = torch.zeros(3, dtype=torch.float64)  # [greedy right, sampled right, prompts with >= 1 right sample]
    shown: List[Dict] = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        answers = [e.answer for e in chunk]
        ids, mask = source.encode(chunk, device)  # [k, P]
        out = rollout.rollout(ids, mask, 1, greedy=True)  # [k, T]
        r, _ = reward(out.texts, answers)  # [k]
        totals[0] += float(r.sum())
        want = max(0, log_samples - sum(1 for s in shown if s["kind"] == "greedy"))
        shown += [{"kind": "greedy", "prompt": e.prompt, "completion": t, "answer": e.answer, "reward": float(x)}
                  for e, t, x in list(zip(chunk, out.texts, r.tolist()))[:want]]
        if samples > 0:
            sb = rollout.rollout(ids, mask, samples)  # [k * samples, T], rows of one prompt together
            rs, _ = reward(sb.texts, [a for a in answers for _ in range(samples)])  # [k * samples]
            rs = rs.reshape(len(chunk), samples)  # [k, samples]
            totals[1] += float(rs.sum())
            totals[2] += float((rs > 0).any(-1).sum())
            want = max(0, log_samples - sum(1 for s in shown if s["kind"] == "sampled"))
            shown += [{"kind": "sampled", "prompt": chunk[j // samples].prompt, "completion": sb.texts[j],
                       "answer": chunk[j // samples].answer, "reward": float(rs.reshape(-1)[j])}
                      for j in range(min(want, len(sb.texts)))]
    totals = all_reduce_sum(totals, info)
    res = {"accuracy": float(totals[0]) / n, "samples": shown if info.main else []}
    if samples > 0:
        res["sampled_accuracy"] = float(totals[1]) / (n * samples)
        res[f"pass_at_{samples}"] = float(totals[2]) / n
    return res


def evaluate_accuracy(rollout, source, examples: List, reward, info: DistInfo, device: torch.device,
                      batch_size: int = 256) -> float:
    """Greedy-decoding accuracy (mean reward) on held-out ``examples``, split across ranks (see :func:`evaluate`)."""
    return evaluate(rollout, source, examples, reward, info, device, batch_size=batch_size)["accuracy"]
