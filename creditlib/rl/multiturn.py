"""Multi-turn rollouts: episodes of a policy against an environment, packed one episode per row.

A row (``EpisodeBatch``) is the prompt (left padded, shared by the ``G`` episodes of a group) and the
transcript after it, right padded::

    completion = [reset observation] turn_0 obs_0 turn_1 obs_1 ... turn_{K-1}

* a turn is the policy's tokens as sampled (the EOS that ended it included; a turn cut at
  ``max_turn_tokens`` has no EOS): ``completion_mask`` True, ``turn_ids`` = its index;
* an observation is the environment's answer, encoded with ``add_special_tokens=False``:
  ``completion_mask`` False (never trained on), ``turn_ids`` -1, ``attention_mask`` True. The answer
  to the LAST turn is not appended (nothing reads it; it is still given to the process scorer);
  nor is the reset observation when it is ``""`` (the usual case);
* padding: pad id, both masks False, ``turn_ids`` -1.

The policy's text is never re-tokenised: each turn's context is the prompt ids plus the row's ids so
far, so the ids in the row are the ids the model sampled (the env gets their decoded text, special
tokens skipped). ``turn_ids`` come from the turn counter, not from the mask: two turns with an empty
observation between them (or a turn without EOS followed by one) stay two turns.

Rewards (``rewards + turn_rewards.sum(-1)`` = the episode's total reward):

* ``rewards[i]`` (the outcome) = the environment's reward of the episode's LAST step;
* ``turn_rewards[i, k]`` = the environment's reward of step ``k`` for the earlier steps
  (``k < K_i - 1``), plus ``process_coef * score[k]`` for every turn when a process scorer is given;
* a failed episode (its ``make_env``/``reset``/``step``/scorer raised, hung past ``timeout`` or
  returned a malformed value; :class:`creditlib.rl.env.SafeEnv`) has ``rewards = 0`` and
  ``turn_rewards = 0``, ``failed = True`` and its error in ``errors``; its tokens stay in the row.

An episode ends when the environment says ``done``, when it fails, or when it is cut: at
``max_turns`` turns, or when ``max_total_tokens`` (a cap on each row's completion tokens, policy and
observations) leaves no room for the next observation and one policy token (``truncated = True``).

Sampling: one :func:`creditlib.generation.generate_tokens` call per turn over every episode still
running (contexts left padded), so a turn costs one ``model.generate`` whatever the batch. Random
draws come from torch's global generator (seed it for reproducible samples); greedy decoding is
deterministic. A vLLM engine is not wired in: :meth:`creditlib.generation.VLLMEngine.generate_tokens`
takes the same left-padded contexts and would slot in per turn, but vLLM cannot run on this
project's CPU machines, so no such path is written or claimed.

Training on the rows: attend to observations (``attention_mask``), score policy tokens only
(``completion_mask``): ``completion_logprobs(model, prompt_ids, prompt_mask, completion_ids,
completion_mask, attention_mask=attention_mask)`` (:meth:`EpisodeBatch.logprobs`). Without
``attention_mask`` the observations would be masked out of the context the policy saw.

The rollout is quiet (no progress bar, no prints): the recipe shows progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..generation import eos_token_ids, generate_tokens, left_pad, pad_token_id
from .env import EnvFailure, Environment, SafeEnv, StepScorer

__all__ = ["EpisodeBatch", "rollout_episodes", "evaluate_episodes", "encode_demonstrations"]


@dataclass
class EpisodeBatch:
    """``B = K prompts x G`` episodes; rows ``[kG, (k+1)G)`` share prompt ``k`` (see the module docstring)."""

    prompt_ids: torch.Tensor        # [B, P] long, left padded
    prompt_mask: torch.Tensor       # [B, P] long (1 = real token)
    completion_ids: torch.Tensor    # [B, T] long: policy and observation tokens in order, right padded
    completion_mask: torch.Tensor   # [B, T] bool: True = a policy token (each turn's EOS included)
    attention_mask: torch.Tensor    # [B, T] bool: True = a real token (policy or observation)
    turn_ids: torch.Tensor          # [B, T] int64: turn of each policy token, -1 elsewhere
    turn_rewards: torch.Tensor      # [B, K] float32: env reward of the earlier steps + process_coef * score
    state_ids: torch.Tensor         # [B, K] int64: state before turn k, -1 beyond the row's turns
    rewards: torch.Tensor           # [B] float32: the env reward of the last step (0 for a failed episode)
    num_turns: torch.Tensor         # [B] long
    failed: torch.Tensor            # [B] bool
    truncated: torch.Tensor         # [B] bool: cut at max_turns / max_total_tokens
    process_scores: Optional[torch.Tensor] = None  # [B, K] float32 raw scorer output (0 beyond turns / failed)
    errors: List[str] = field(default_factory=list)  # [B] "" for a fine episode
    texts: List[str] = field(default_factory=list)   # [B] the transcript after the prompt, decoded
    group_size: int = 1
    generated_tokens: int = 0       # policy tokens sampled

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def row_tokens(self) -> int:
        """Completion tokens in the rows: policy and observation tokens (what a training forward covers)."""
        return int(self.attention_mask.sum())

    def select(self, idx: torch.Tensor) -> "EpisodeBatch":
        """Rows ``idx`` (for minibatches); lists follow; ``generated_tokens`` becomes the policy tokens in them."""
        il = idx.tolist()
        t = {k: getattr(self, k)[idx] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                               "attention_mask", "turn_ids", "turn_rewards", "state_ids", "rewards",
                                               "num_turns", "failed", "truncated")}
        return replace(self, **t, process_scores=None if self.process_scores is None else self.process_scores[idx],
                       errors=[self.errors[i] for i in il] if self.errors else [],
                       texts=[self.texts[i] for i in il] if self.texts else [],
                       generated_tokens=int(self.completion_mask[idx].sum()))

    def total_rewards(self) -> torch.Tensor:
        """``[B]`` float32: ``rewards + turn_rewards.sum(-1)``, each episode's total reward."""
        return self.rewards + self.turn_rewards.sum(-1)

    def logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        """``[B, T]`` log-probs of the row's tokens under ``model`` (tempered; attending to the
        observations; 0 off the policy tokens), differentiable."""
        from .model import completion_logprobs

        return completion_logprobs(model, self.prompt_ids, self.prompt_mask, self.completion_ids,
                                   self.completion_mask, temperature,
                                   attention_mask=self.attention_mask)  # [B, T]

    def summary(self) -> Dict[str, float]:
        """Floats for logging: ``episodes``, ``failed_episodes``, ``truncated_episodes``, ``mean_turns``,
        ``success_rate`` (outcome reward > 0, not failed), ``mean_return`` (total reward),
        ``generated_tokens``, ``row_tokens`` and, with a process scorer, ``process_score`` (the mean
        score over the turns of the episodes that did not fail)."""
        B = max(1, self.batch_size)
        out = {
            "episodes": float(self.batch_size),
            "failed_episodes": float(self.failed.sum()),
            "truncated_episodes": float(self.truncated.sum()),
            "mean_turns": float(self.num_turns.float().sum()) / B,
            "success_rate": float(((self.rewards > 0) & ~self.failed).float().sum()) / B,
            "mean_return": float(self.total_rewards().sum()) / B,
            "generated_tokens": float(self.generated_tokens),
            "row_tokens": float(self.row_tokens),
        }
        if self.process_scores is not None:
            K = self.process_scores.shape[1]
            turn = torch.arange(K, device=self.num_turns.device)  # [K]
            valid = (turn[None, :] < self.num_turns[:, None]) & ~self.failed[:, None]  # [B, K]
            n = int(valid.sum())
            out["process_score"] = float(self.process_scores[valid].sum()) / n if n else float("nan")
        return out


# ----------------------------------------------------------------------------- checks
def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _check_examples(examples) -> list:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("examples must be a non-empty list of Example (with .prompt)")
    for i, e in enumerate(examples):
        if not isinstance(getattr(e, "prompt", None), str):
            raise ValueError(f"examples[{i}] has no string .prompt (got {type(e).__name__})")
    return list(examples)


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> List[int]:
    if not text and not add_special_tokens:
        return []
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# ----------------------------------------------------------------------------- rollout
def rollout_episodes(model, tokenizer, make_env: Callable[[], Environment], examples: Sequence, group_size: int, *,
                     max_turns: int, max_turn_tokens: int, temperature: float = 1.0, greedy: bool = False,
                     timeout: float = 5.0, process_reward: Optional[StepScorer] = None, process_coef: float = 0.0,
                     device=None, max_total_tokens: Optional[int] = None,
                     add_special_tokens: bool = True) -> EpisodeBatch:
    """Run ``group_size`` episodes of each example with ``model`` (transformers) and pack them.

    Args:
        model, tokenizer: a ``transformers`` causal LM and its tokenizer.
        make_env: ``make_env() -> Environment``, called once per episode.
        examples: ``K`` examples (``.prompt``; the environment reads what else it needs).
        group_size: ``G`` episodes per example (rows ``[kG, (k+1)G)``).
        max_turns: turns per episode before it is cut (``truncated``).
        max_turn_tokens: tokens per turn (EOS included); a turn that reaches it without EOS ends there.
        temperature, greedy: sampling (``greedy``: argmax, deterministic).
        timeout: seconds allowed per environment call (and per scorer call).
        process_reward: a :class:`~creditlib.rl.env.StepScorer`; its scores are in
            ``process_scores`` and ``process_coef * score`` is added to ``turn_rewards``.
        process_coef: weight of the process scores (non-zero needs ``process_reward``).
        device: where the model's inputs go (default: the model's device).
        max_total_tokens: cap on each row's completion tokens (``None``: none).
        add_special_tokens: encode prompts with the tokenizer's special tokens (the source's
            ``add_special_tokens``: ``True`` for the char tokenizer's ``<bos>``, ``False`` for chat
            templates that carry their own).

    Returns an :class:`EpisodeBatch` (rows as in the module docstring). Environment failures never
    raise; bad arguments raise ``ValueError``; NaN/inf logits raise
    :class:`creditlib.rl.model.NonFiniteError`.
    """
    from .rollout import _FiniteCheck

    examples = _check_examples(examples)
    G = _pos_int("group_size", group_size)
    max_turns = _pos_int("max_turns", max_turns)
    max_turn_tokens = _pos_int("max_turn_tokens", max_turn_tokens)
    budget = math.inf if max_total_tokens is None else _pos_int("max_total_tokens", max_total_tokens)
    if not greedy and (isinstance(temperature, bool) or not isinstance(temperature, Real)
                       or not math.isfinite(temperature) or not temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if isinstance(process_coef, bool) or not isinstance(process_coef, Real) or not math.isfinite(process_coef):
        raise ValueError(f"process_coef must be a finite float, got {process_coef!r}")
    if process_reward is not None and not callable(getattr(process_reward, "score", None)):
        raise ValueError(f"process_reward must have a score(example, actions, observations) method, "
                         f"got {type(process_reward).__name__}")
    if process_coef != 0 and process_reward is None:
        raise ValueError(f"process_coef={process_coef} needs a process_reward (a StepScorer)")
    if not callable(make_env):
        raise ValueError(f"make_env must be a zero-argument callable returning an Environment, "
                         f"got {type(make_env).__name__}")
    dev = device if device is not None else next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = eos_token_ids(tokenizer, getattr(model, "module", model))

    K, B = len(examples), len(examples) * G
    prompts = [_encode(tokenizer, e.prompt, add_special_tokens) for e in examples]
    for k, p in enumerate(prompts):
        if not p:
            raise ValueError(f"examples[{k}].prompt encodes to no tokens; a turn needs a context")
    envs = [SafeEnv(make_env, timeout) for _ in range(B)]
    rows: List[List[int]] = [[] for _ in range(B)]      # completion ids per episode
    policy: List[List[bool]] = [[] for _ in range(B)]   # True = a policy token
    tids: List[List[int]] = [[] for _ in range(B)]      # turn of each token, -1 for observations
    states: List[List[int]] = [[] for _ in range(B)]    # state before each turn
    env_rewards: List[List[float]] = [[] for _ in range(B)]
    actions: List[List[str]] = [[] for _ in range(B)]
    observations: List[List[str]] = [[] for _ in range(B)]
    failed, truncated, errors = [False] * B, [False] * B, [""] * B
    current = [-1] * B

    def fail(i: int, msg: str) -> None:
        failed[i], errors[i] = True, msg

    def observe(i: int, text: str) -> bool:
        """Append an observation; False (episode cut) when it and one more policy token do not fit."""
        ids = _encode(tokenizer, text)
        if len(rows[i]) + len(ids) + 1 > budget:
            truncated[i] = True
            return False
        rows[i] += ids
        policy[i] += [False] * len(ids)
        tids[i] += [-1] * len(ids)
        return True

    active = []
    for i in range(B):
        try:
            r = envs[i].reset(examples[i // G])
        except EnvFailure as e:
            fail(i, str(e))
            continue
        if observe(i, r.observation):
            current[i] = r.state_id
            active.append(i)

    generated = 0
    for t in range(max_turns):
        if not active:
            break
        ids, mask = left_pad([prompts[i // G] + rows[i] for i in active], pad, dev)  # [A, C]
        out = generate_tokens(model, tokenizer, ids, mask, 1, max_new_tokens=max_turn_tokens, greedy=greedy,
                              temperature=temperature, eos_ids=eos, logits_processors=[_FiniteCheck()])
        lens = out.completion_mask.sum(-1).tolist()  # [A] tokens up to and including the first EOS
        comp = out.completion_ids.tolist()  # [A, T']
        still = []
        for a, i in enumerate(active):
            toks = comp[a][:lens[a]]
            generated += len(toks)
            toks = toks[:int(min(len(toks), budget - len(rows[i])))]  # >= 1 left by construction
            rows[i] += toks
            policy[i] += [True] * len(toks)
            tids[i] += [t] * len(toks)
            states[i].append(current[i])
            action = tokenizer.decode(toks, skip_special_tokens=True)
            actions[i].append(action)
            try:
                st = envs[i].step(action)
            except EnvFailure as e:
                fail(i, f"turn {t}: {e}")
                env_rewards[i].append(0.0)
                observations[i].append("")
                continue
            env_rewards[i].append(st.reward)
            observations[i].append(st.observation)
            if st.done:
                continue
            if t + 1 >= max_turns or len(rows[i]) >= budget:
                truncated[i] = True
                continue
            if observe(i, st.observation):
                current[i] = st.state_id
                still.append(i)
        active = still

    scores: List[List[float]] = [[] for _ in range(B)]
    if process_reward is not None:
        for i in range(B):
            if failed[i] or not actions[i]:
                continue
            try:
                scores[i] = envs[i].score(process_reward, examples[i // G], actions[i], observations[i])
            except EnvFailure as e:
                fail(i, str(e))

    # ---- pack
    T = max(1, max(len(r) for r in rows))
    Kt = max(1, max(len(a) for a in actions))
    completion_ids = torch.full((B, T), pad, dtype=torch.long)  # [B, T]
    completion_mask = torch.zeros((B, T), dtype=torch.bool)  # [B, T]
    attention_mask = torch.zeros((B, T), dtype=torch.bool)  # [B, T]
    turn_ids = torch.full((B, T), -1, dtype=torch.int64)  # [B, T]
    turn_rewards = torch.zeros((B, Kt), dtype=torch.float32)  # [B, K]
    process_scores = torch.zeros((B, Kt), dtype=torch.float32) if process_reward is not None else None  # [B, K]
    state_ids = torch.full((B, Kt), -1, dtype=torch.int64)  # [B, K]
    rewards = torch.zeros(B, dtype=torch.float32)  # [B]
    num_turns = torch.tensor([len(a) for a in actions], dtype=torch.long)  # [B]
    for i in range(B):
        n, L = len(actions[i]), len(rows[i])
        if L:
            completion_ids[i, :L] = torch.as_tensor(rows[i], dtype=torch.long)
            completion_mask[i, :L] = torch.as_tensor(policy[i], dtype=torch.bool)
            attention_mask[i, :L] = True
            turn_ids[i, :L] = torch.as_tensor(tids[i], dtype=torch.int64)
        if n:
            state_ids[i, :n] = torch.as_tensor(states[i], dtype=torch.int64)
        if failed[i] or not n:
            continue
        rewards[i] = env_rewards[i][-1]
        turn_rewards[i, :n - 1] = torch.as_tensor(env_rewards[i][:-1], dtype=torch.float32)
        if process_scores is not None:
            process_scores[i, :n] = torch.as_tensor(scores[i], dtype=torch.float32)
            turn_rewards[i, :n] += float(process_coef) * process_scores[i, :n]
    pid, pmask = left_pad(prompts, pad, dev)  # [K, P]
    d = lambda x: x.to(dev)  # noqa: E731
    return EpisodeBatch(
        prompt_ids=pid.repeat_interleave(G, 0), prompt_mask=pmask.repeat_interleave(G, 0),
        completion_ids=d(completion_ids), completion_mask=d(completion_mask), attention_mask=d(attention_mask),
        turn_ids=d(turn_ids), turn_rewards=d(turn_rewards), state_ids=d(state_ids), rewards=d(rewards),
        num_turns=d(num_turns), failed=d(torch.tensor(failed, dtype=torch.bool)),
        truncated=d(torch.tensor(truncated, dtype=torch.bool)),
        process_scores=None if process_scores is None else d(process_scores), errors=errors,
        texts=[tokenizer.decode(r, skip_special_tokens=True) for r in rows], group_size=G,
        generated_tokens=generated)


def evaluate_episodes(model, tokenizer, make_env: Callable[[], Environment], examples: Sequence, *, max_turns: int,
                      max_turn_tokens: int, batch_size: int = 256, **kw) -> Dict[str, float]:
    """Greedy episodes on (held-out) ``examples``, one per example, ``batch_size`` examples per rollout.

    ``kw`` goes to :func:`rollout_episodes` (``timeout``, ``process_reward``, ``process_coef``,
    ``device``, ``max_total_tokens``, ``add_special_tokens``; not ``greedy``/``temperature``/
    ``group_size``). Returns floats: ``success_rate`` (outcome reward > 0, not failed), ``mean_return``,
    ``mean_turns``, ``episodes``, ``failed_episodes``, ``truncated_episodes`` and, with a process
    scorer, ``process_score`` (mean over scored turns). Deterministic (greedy decoding).
    """
    for bad in ("greedy", "temperature", "group_size"):
        if bad in kw:
            raise ValueError(f"evaluate_episodes decodes greedily, one episode per example; do not pass {bad}=")
    examples = _check_examples(examples)
    batch_size = _pos_int("batch_size", batch_size)
    tot = {"success": 0.0, "ret": 0.0, "turns": 0.0, "failed": 0.0, "truncated": 0.0, "ps": 0.0, "ps_n": 0.0}
    scored = kw.get("process_reward") is not None
    for s in range(0, len(examples), batch_size):
        b = rollout_episodes(model, tokenizer, make_env, examples[s:s + batch_size], 1, max_turns=max_turns,
                             max_turn_tokens=max_turn_tokens, greedy=True, **kw)
        tot["success"] += float(((b.rewards > 0) & ~b.failed).sum())
        tot["ret"] += float(b.total_rewards().sum())
        tot["turns"] += float(b.num_turns.sum())
        tot["failed"] += float(b.failed.sum())
        tot["truncated"] += float(b.truncated.sum())
        if scored:
            Kb = b.process_scores.shape[1]
            valid = (torch.arange(Kb, device=b.num_turns.device)[None, :] < b.num_turns[:, None]) & ~b.failed[:, None]
            tot["ps"] += float(b.process_scores[valid].sum())
            tot["ps_n"] += float(valid.sum())
    n = float(len(examples))
    out = {"episodes": n, "success_rate": tot["success"] / n, "mean_return": tot["ret"] / n,
           "mean_turns": tot["turns"] / n, "failed_episodes": tot["failed"], "truncated_episodes": tot["truncated"]}
    if scored:
        out["process_score"] = tot["ps"] / tot["ps_n"] if tot["ps_n"] else float("nan")
    return out


# ----------------------------------------------------------------------------- demonstrations
def encode_demonstrations(tokenizer, make_env: Callable[[], Environment], examples: Sequence, *,
                          actions: Optional[Sequence[Sequence[str]]] = None, add_special_tokens: bool = True,
                          device=None, timeout: float = 5.0):
    """Whole demonstration transcripts for supervised warm-up, in the rollout's row layout.

    Each example's demonstration (``actions[i]``, default ``examples[i].actions``: the policy turns'
    texts, without EOS) is replayed in a fresh environment; the row is the prompt, then each turn's
    tokens and an EOS, with the environment's answers between turns (the answer to the last turn is
    not appended, as in a rollout). Returns ``ids [K, L]`` (right padded), ``attn [K, L]`` (long, 1 on
    every real token) and ``labels [K, L]`` (the turns' tokens and EOS; -100 on the prompt, the
    observations and the padding), the layout of
    :meth:`creditlib.rl.data._Source.encode_sft`.

    Raises ``ValueError`` naming the example when it has no demonstration, the environment fails on
    it, or the episode ends before the demonstration does.
    """
    examples = _check_examples(examples)
    if actions is None:
        actions = [getattr(e, "actions", None) for e in examples]
    if len(actions) != len(examples):
        raise ValueError(f"actions must have one demonstration per example: {len(actions)} for {len(examples)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; a demonstration's turns end with one")
    rows, labs = [], []
    for i, (e, acts) in enumerate(zip(examples, actions)):
        if not acts:
            raise ValueError(f"example {i} ({e.prompt!r}) has no demonstration actions (an EnvExample with "
                             "actions, or pass actions=)")
        env = SafeEnv(make_env, timeout)
        p = _encode(tokenizer, e.prompt, add_special_tokens)
        row, lab = list(p), [-100] * len(p)
        try:
            r = env.reset(e)
            obs = _encode(tokenizer, r.observation)
            row += obs
            lab += [-100] * len(obs)
            for k, a in enumerate(acts):
                toks = _encode(tokenizer, a) + [eos]
                row += toks
                lab += toks
                st = env.step(a)
                if k < len(acts) - 1:
                    if st.done:
                        raise ValueError(f"example {i} ({e.prompt!r}): the episode ends at turn {k} but the "
                                         f"demonstration has {len(acts)} turns")
                    obs = _encode(tokenizer, st.observation)
                    row += obs
                    lab += [-100] * len(obs)
        except EnvFailure as err:
            raise ValueError(f"example {i} ({e.prompt!r}): the environment failed on the demonstration: "
                             f"{err}") from None
        rows.append(row)
        labs.append(lab)
    from .data import pad_sft_rows

    return pad_sft_rows(rows, labs, pad_token_id(tokenizer), device)  # ids, attn, labels [K, L]
