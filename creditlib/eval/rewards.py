"""Rewards for RL training loops, built on the same checker as the evaluator.

Both functions take a batch and return one float per sample; a sample that cannot be read,
parsed or verified in time scores 0.0 and never raises, so one bad completion cannot stop a
training run. They accept TRL's calling convention too (``completions`` may be chat messages,
extra keyword columns are ignored), so ``accuracy_reward`` can be passed to ``GRPOTrainer``
as ``reward_funcs`` with a dataset whose gold column is named ``answer``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .extract import last_boxed
from .verify import DEFAULT_TIMEOUT, is_correct_batch

__all__ = ["accuracy_reward", "format_reward"]


def _text(completion: Any) -> str | None:
    """A completion as text: a string, or TRL's conversational form (list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        return completion["content"]
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            return last["content"]
    return None


def accuracy_reward(
    completions: Sequence[Any],
    answers: Sequence[Any] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    last_number_fallback: bool = False,
    **kwargs: Any,
) -> list[float]:
    """1.0 where the completion's final answer equals the gold answer, else 0.0.

    Args:
        completions: ``B`` model outputs (strings or TRL chat messages).
        answers: ``B`` gold answers (strings, numbers or lists of strings). TRL passes dataset
            columns as keywords: ``answer=`` is accepted as well.
        timeout: per-sample time limit in seconds (enforced in worker processes).
        last_number_fallback: also accept a bare last number when the completion has no
            ``\\boxed{}``, ``####`` or "the answer is" (off by default for training, so the
            reward asks for an explicitly stated answer).

    Returns:
        ``list[float]`` of length ``B`` with values in {0.0, 1.0}.
    """
    if answers is None:
        answers = kwargs.get("answer")
    if answers is None:
        raise ValueError("answers must be given (a sequence of gold answers, one per completion)")
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
    texts = [_text(c) for c in completions]
    ok = is_correct_batch(texts, list(answers), timeout=timeout, last_number_fallback=last_number_fallback)
    return [1.0 if x else 0.0 for x in ok]


# It enforces ``timeout`` per sample itself (worker processes, killed when they overrun), so a
# wrapper such as creditlib.rl.rewards.SafeReward passes its limit in instead of adding an alarm.
accuracy_reward.bounded_time = True


_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def format_reward(completions: Sequence[Any], answers: Sequence[Any] | None = None, *, require_think: bool = False,
                  **kwargs: Any) -> list[float]:
    """1.0 where the completion states its answer in one complete ``\\boxed{...}`` (and, with
    ``require_think``, reasons inside ``<think>...</think>`` first), else 0.0.

    ``answers`` is accepted and ignored so that both rewards share one signature. Pure string
    scanning with bounded work; never raises on any completion.
    """
    out = []
    for c in completions:
        t = _text(c)
        try:
            ok = t is not None and last_boxed(t) is not None
            if ok and require_think:
                m = _THINK_RE.search(t[:200_000])
                ok = m is not None and t.rfind("\\boxed") > m.end() - 1
        except Exception:
            ok = False
        out.append(1.0 if ok else 0.0)
    return out
