"""The training pieces of the recipes: supervised warm-up, evaluation, and the one optimizer step.

The recipes' update (``grpo_step`` in ``recipes/grpo.py``) is built from the TensorDict credit
modules and :class:`creditlib.losses.GRPOLambdaLoss`; for each minibatch it calls
:func:`optimizer_step`, the one backward / clip / step sequence of the recipe and the warm-up::

    check the loss finite -> backward -> clip the gradient norm -> check it finite -> optimizer step

It never takes an optimizer step on a NaN/inf loss or gradient (it raises :class:`NonFiniteError`
first), so the weights and the optimizer state stay those of the last good step.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .distributed import DistInfo, all_reduce_sum, reshard
from .model import NonFiniteError

__all__ = ["make_optimizer", "optimizer_step", "sft_warmup", "evaluate", "evaluate_env", "all_finite", "clip_grad_norm",
           "NonFiniteError"]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over the policy's (sharded) parameters."""
    reshard(model)  # FSDP2: a forward without backward leaves the root's parameters unsharded
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def sft_warmup(model, source, cfg, info: DistInfo, device: torch.device,
               validate: Callable[[], float], log: Callable[[Dict], None], progress: bool = True,
               say: Optional[Callable[[str], None]] = None) -> Dict:
    """Supervised warm-up: cross-entropy on worked solutions until validation accuracy reaches
    ``cfg.sft_target_accuracy`` (checked every ``cfg.sft_eval_every`` steps) or ``cfg.sft_steps``.

    The stopping rule is a moving average: with ``W = cfg.sft_target_window`` and validation
    accuracies ``a_1 .. a_k`` so far, the warm-up stops at the first evaluation ``k`` where

        mean(a_{k-W+1} .. a_k) >= sft_target_accuracy        (only once k >= W)

    ``W = 1`` is the latest accuracy alone; ``W > 1`` keeps one lucky evaluation (a spike on a
    small validation set) from stopping it. The evaluation at the last step (``cfg.sft_steps``)
    applies the same rule. Stopping at a target accuracy leaves the same headroom for RL whatever
    the seed; ``say`` (the main rank's ``print``) announces where and why the warm-up stopped.
    Returns ``{"sft_steps", "sft_val_accuracy", "sft_val_mean", "position", "reached_target"}``
    (``sft_val_accuracy``: the last validation accuracy; ``sft_val_mean``: the mean of the last
    ``min(W, evaluations)`` of them, NaN with no evaluation; position: next training example).
    """
    import math

    from tqdm.auto import tqdm

    window = int(getattr(cfg, "sft_target_window", 1))
    if window < 1:
        raise ValueError(f"cfg.sft_target_window must be a positive integer, got {window!r}")
    reshard(model)  # FSDP2: the optimizer must hold the sharded parameters (evaluation leaves the root unsharded)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    pos, acc, step, reached = 0, float("nan"), 0, False
    accs: List[float] = []  # validation accuracies so far, in order
    bar = tqdm(total=cfg.sft_steps, desc="SFT warm-up", disable=not (progress and info.main), dynamic_ncols=True)
    for step in range(1, cfg.sft_steps + 1):
        exs, pos = source.next_batch(pos, cfg.sft_batch_size)  # global batch
        ids, attn, labels = source.encode_sft(exs[info.rank::info.world_size], device)  # [b, L] each
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        optimizer_step(model, opt, loss, info, 1.0, what="the warm-up loss")
        rec = {"phase": "sft", "step": step, "loss": float(loss.detach())}
        bar.update(1)
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_steps:
            acc = float(validate())
            if math.isnan(acc):
                raise ValueError(f"validate() returned NaN at warm-up step {step}; expected an accuracy in [0, 1]")
            accs.append(acc)
            rec["val_accuracy"] = acc
            if window > 1:
                rec["val_accuracy_mean"] = sum(accs[-window:]) / len(accs[-window:])
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val_acc=f"{acc:.2f}")
            if (cfg.sft_target_accuracy > 0 and len(accs) >= window
                    and sum(accs[-window:]) / window >= cfg.sft_target_accuracy):
                reached = True
                log(rec)
                break
        log(rec)
    if reached:  # the bar would stop at "12% 50/400" and look broken: end it at this step
        bar.total = step
        bar.refresh()
    bar.close()
    del opt
    mean = sum(accs[-window:]) / len(accs[-window:]) if accs else float("nan")
    if say is not None:
        if window > 1:
            what = f"the mean validation accuracy of the last {min(window, len(accs))} evaluations {mean:.3f} (latest {acc:.3f})"
        else:
            what = f"validation accuracy {acc:.3f}"
        if reached:
            say(f"SFT warm-up: {what} reached the target {cfg.sft_target_accuracy:g} at step "
                f"{step} (of at most {cfg.sft_steps}); warm-up done")
        else:
            say(f"SFT warm-up: {step} steps, {what}"
                + (f" (target {cfg.sft_target_accuracy:g} not reached"
                   + (f" by the mean of {window} evaluations" if window > 1 else "") + ")"
                   if cfg.sft_target_accuracy > 0 else ""))
    return {"sft_steps": step, "sft_val_accuracy": acc, "sft_val_mean": mean, "position": pos, "reached_target": reached}


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


@torch.no_grad()
def evaluate_env(model, tokenizer, source, examples: List, info: DistInfo, device: torch.device, *, max_turns: int,
                 max_turn_tokens: int, timeout: float, temperature: float = 1.0, samples: int = 0,
                 log_samples: int = 0, batch_size: int = 256) -> Dict:
    """:func:`evaluate` for a multi-turn environment: episodes instead of completions.

    ``accuracy`` is the greedy success rate (the episode's outcome reward > 0 and it did not fail),
    one episode per example (:func:`creditlib.rl.multiturn.rollout_episodes` with the source's
    ``make_env``); with ``samples = k > 0``, ``k`` sampled episodes per example at ``temperature``
    give ``sampled_accuracy`` and ``pass_at_k``. Also ``mean_turns`` and ``failed_episodes`` of the
    greedy episodes. ``samples`` (the list) holds the first ``log_samples`` transcripts of the main
    rank, as :func:`evaluate` does. Every rank runs the same number of rollouts.
    """
    from .multiturn import rollout_episodes

    n = len(examples) - len(examples) % info.world_size
    if n == 0:
        raise ValueError(f"need at least {info.world_size} held-out examples, got {len(examples)}")
    mine = examples[info.rank:n:info.world_size]
    kw = dict(max_turns=max_turns, max_turn_tokens=max_turn_tokens, timeout=timeout, device=device,
              add_special_tokens=source.add_special_tokens)
    totals = torch.zeros(5, dtype=torch.float64)  # [greedy wins, sampled wins, prompts with a win, turns, failed]
    shown: List[Dict] = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        b = rollout_episodes(model, tokenizer, source.make_env, chunk, 1, greedy=True, **kw)  # [k] episodes
        won = ((b.rewards > 0) & ~b.failed).double()  # [k]
        totals[0] += float(won.sum())
        totals[3] += float(b.num_turns.sum())
        totals[4] += float(b.failed.sum())
        want = max(0, log_samples - sum(1 for s in shown if s["kind"] == "greedy"))
        shown += [{"kind": "greedy", "prompt": e.prompt, "completion": t, "answer": e.answer, "reward": float(w)}
                  for e, t, w in list(zip(chunk, b.texts, won.tolist()))[:want]]
        if samples > 0:
            sb = rollout_episodes(model, tokenizer, source.make_env, chunk, samples, temperature=temperature,
                                  **kw)  # [k * samples], the episodes of one example together
            ws = ((sb.rewards > 0) & ~sb.failed).double().reshape(len(chunk), samples)  # [k, samples]
            totals[1] += float(ws.sum())
            totals[2] += float((ws > 0).any(-1).sum())
            want = max(0, log_samples - sum(1 for s in shown if s["kind"] == "sampled"))
            shown += [{"kind": "sampled", "prompt": chunk[j // samples].prompt, "completion": sb.texts[j],
                       "answer": chunk[j // samples].answer, "reward": float(ws.reshape(-1)[j])}
                      for j in range(min(want, len(sb.texts)))]
    totals = all_reduce_sum(totals, info)
    res = {"accuracy": float(totals[0]) / n, "mean_turns": float(totals[3]) / n, "failed_episodes": float(totals[4]),
           "samples": shown if info.main else []}
    if samples > 0:
        res["sampled_accuracy"] = float(totals[1]) / (n * samples)
        res[f"pass_at_{samples}"] = float(totals[2]) / n
    return res
