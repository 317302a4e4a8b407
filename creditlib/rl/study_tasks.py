"""Extra synthetic tasks for the learning study (``benchmarks/learning_study.py``).

:class:`EarlyDecisionTask` is built so that the decisive token comes first: the completion opens
with one digit (the decision) that alone decides the reward, followed by many filler tokens that do
not affect it::

    prompt      7++-+++-?                               (a dial walk, as in ChainTask)
    completion  1++-+++-++-+++-++-+++-++-+++-++-        (decision "1" = where the walk ends, then filler)
    answer      1

The decision is the end position of the walk (start digit plus the net number of ``+`` moves,
mod 10), computed "in one token" with no written steps. The filler repeats the prompt's moves up to
``filler_length`` characters; it is easy to copy and has no bearing on the reward
(:func:`early_decision_reward` reads the first character only). A plain GRPO update gives every
token of a completion the same advantage, so the decision token's share of the gradient is
``1 / (filler_length + 2)``; token-level credit (the eligibility trace) should matter most here.

The class has the interface of :class:`creditlib.rl.task.ChainTask` (``problem``, ``heldout``,
``train``, ``iter_train``, ``completion_length``, ``num_ops``, ``data_seed``) and uses the same
character vocabulary, so it plugs into :class:`creditlib.rl.data.SyntheticSource` and the
embedded tokenizer unchanged; only the reward differs (:func:`early_decision_reward`).
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence

from .task import ChainProblem, ChainTask

__all__ = ["EarlyDecisionTask", "early_decision_reward", "extract_decision"]

_MOVES = {"+": 1, "-": -1}


def extract_decision(completion: str) -> Optional[str]:
    """The first non-blank character of a completion (the decision), or ``None`` for an empty one."""
    s = completion.strip()
    return s[0] if s else None


def early_decision_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where the completion's first character equals the reference decision, else 0.0.

    Everything after the first character (the filler) is ignored.
    """
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
    return [1.0 if extract_decision(c) == str(a).strip() else 0.0 for c, a in zip(completions, answers)]


class EarlyDecisionTask(ChainTask):
    """Generator of early-decision problems (see the module docstring).

    Inherits ``heldout``, ``train`` and ``iter_train`` from :class:`ChainTask`; its own
    ``__init__`` and ``_distinct`` keep the study's held-out splits exactly as they were drawn.

    Args:
        num_ops: moves of the walk in the prompt (>= 1); there are ``10 * 2**num_ops`` distinct prompts.
        filler_length: filler characters after the decision (>= 1); completions are
            ``filler_length + 1`` characters + EOS.
        data_seed: seed of the generator; with the split name and the index it fixes a problem.
        heldout_sizes: sizes of the held-out splits excluded from training, e.g. ``{"test": 512, "val": 256}``.
    """

    def __init__(self, num_ops: int = 8, filler_length: int = 24, data_seed: int = 1234,
                 heldout_sizes: Optional[dict] = None):
        if not isinstance(num_ops, int) or isinstance(num_ops, bool) or num_ops < 1:
            raise ValueError(f"num_ops must be a positive int, got {num_ops!r}")
        if not isinstance(filler_length, int) or isinstance(filler_length, bool) or filler_length < 1:
            raise ValueError(f"filler_length must be a positive int, got {filler_length!r}")
        self.num_ops = num_ops
        self.filler_length = filler_length
        self.data_seed = int(data_seed)
        self.heldout_sizes = dict(heldout_sizes or {"test": 512, "val": 256})
        if sum(self.heldout_sizes.values()) > 10 * 2 ** num_ops // 2:
            raise ValueError(f"held-out splits {self.heldout_sizes} need more than half of the {10 * 2 ** num_ops} "
                             f"distinct problems with num_ops={num_ops}; use more moves or smaller splits")
        self._heldout = {name: self._distinct(name, n) for name, n in self.heldout_sizes.items()}
        self._excluded = {p.prompt for probs in self._heldout.values() for p in probs}

    @property
    def completion_length(self) -> int:
        """Tokens of a full solution including the EOS token."""
        return self.filler_length + 2

    def problem(self, split: str, index: int) -> ChainProblem:
        """Problem ``index`` of ``split`` (a pure function of ``data_seed``, ``split`` and ``index``)."""
        rng = random.Random(f"early:{self.data_seed}:{split}:{index}")
        r = rng.randrange(10)
        ops = [rng.choice("+-") for _ in range(self.num_ops)]
        prompt = str(r) + "".join(ops) + "?"
        for op in ops:
            r = (r + _MOVES[op]) % 10
        reps = -(-self.filler_length // self.num_ops)  # ceil
        filler = ("".join(ops) * reps)[:self.filler_length]
        return ChainProblem(prompt, str(r) + filler, str(r))

    def _distinct(self, split: str, n: int) -> List[ChainProblem]:
        out, seen, i = [], set(), 0
        while len(out) < n:
            p = self.problem(split, i)
            i += 1
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out
