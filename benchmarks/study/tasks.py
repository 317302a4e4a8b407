"""Extra synthetic tasks for the learning study (``benchmarks/learning_study.py``).

They reach the recipes through the task registry, ONE :func:`~creditlib.rl.registry.register_dataset`
call per task, all made by :func:`register_tasks` in the runner's child processes before the recipe
parses its command line::

    from study.tasks import register_tasks
    register_tasks()            # --dataset walk | early | late | long now work in this process

Every task is a dial walk in the prompt (as in :class:`creditlib.rl.task.ChainTask`). In ``walk`` the
completion writes every step and each one feeds the answer; the others differ in WHERE in the
completion their one decisive token sits. The other completion tokens are filler that the
reward ignores: the prompt's moves repeated, or (before ``long``'s decision) ``=`` signs:

=========  ==============================================  ==========================  ==========
dataset    completion (8-move walk, answer ``1``)          reward reads                tokens
=========  ==============================================  ==========================  ==========
``walk``   the position after every move, ``=``, answer    the digit after the last =  num_ops + 3
``early``  ``1`` + 24 moves                                the first character         26
``late``   24 ``=`` + ``1``                                the last character          26
``long``   32 ``=`` + ``1`` + 32 moves                     the first digit             66
=========  ==============================================  ==========================  ==========

(tokens: the full completion with its EOS token.)

* ``walk`` is the embedded task (``--dataset synthetic``: same generator, same splits, same reward);
  it is registered again only so that its held-out split can be switched (below).
* ``early`` (:class:`EarlyDecisionTask`): the first token decides; token-level credit toward early
  tokens (the eligibility trace) should matter most here.
* ``late`` (:class:`LateDecisionTask`): the control: the LAST token decides, so credit moved toward
  early tokens should not help; the study asks whether it hurts.
* ``long`` (:class:`LongDecisionTask`): completions of 65 tokens + EOS where one step in the MIDDLE
  decides: the long-completion regime the GRPO-lambda paper claims.

The decision is the end position of the walk (start digit plus the net number of ``+`` moves, mod
10), computed "in one token" with no written steps. A plain GRPO update gives every token of a
completion the same advantage, so the decisive token's share of the gradient is ``1 / T``.

The filler BEFORE a decision is ``=`` (a sign the walk does not use) rather than the moves. Pilot
warm-ups of the 495k-parameter model (2026-11-30): ``long`` with moves before the decision was still at
chance (validation accuracy 0.10) at step 310 when it was stopped; with ``=`` it sat near 0.2 from step
400 and jumped to 0.52 at step 990. ``late`` (``=``) sat at 0.16-0.22 through 800 steps. A decision
late in the completion is slow to learn for this model either way; the study's warm-ups allow 1500 steps.
In the study2 sweep (2026-11-30) ``late``'s warm-up (batch 64) again stalled: greedy 0.18-0.21 at its
1500-step cap (about what knowing the start digit's parity gives: 0.2), and so confident that a group's
8 samples almost always agreed (train reward 0.17-0.19, pre-clip gradient norm 0.06-0.08): 50 RL steps
at any rate from 2e-5 to 2e-4 left validation accuracy at 0.18-0.20 for every method. Filling with the
prompt's moves instead (``before_fill="moves"``) was worse: chance (0.07-0.11) at 1500 steps. The study
therefore warms ``late`` up with batches of 128 for up to 2500 steps (``TASKS`` in the runner).

**Held-out split.** The recipe evaluates on a source's ``heldout(n)``. Each study source serves the
``test`` split there, or the ``val`` split when the environment variable ``STUDY_EVAL_SPLIT=val`` is
set in the run's process: the runner's learning-rate selection runs evaluate on ``val`` and the
reported runs on ``test``. The splits are drawn like ChainTask's (``test`` first, then ``val``
excluding ``test``) and never appear in training.
"""

from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence

from creditlib.rl.data import SyntheticSource
from creditlib.rl.task import ChainProblem, ChainTask

__all__ = ["DecisionTask", "EarlyDecisionTask", "LateDecisionTask", "LongDecisionTask", "SplitSource",
           "early_decision_reward", "late_decision_reward", "first_digit_reward", "extract_decision",
           "extract_last", "extract_first_digit", "register_tasks", "eval_split", "STUDY_DATASETS",
           "EARLY_DATASET", "EARLY_FILLER", "LONG_SIDE"]

#: The ``--dataset`` name of the early-decision task, and its default filler length (the
#: environment variable ``STUDY_EARLY_FILLER`` overrides it in a run; it also sets ``late``'s).
EARLY_DATASET = "early"
EARLY_FILLER = 24
#: Filler tokens on EACH side of the decision in ``long`` (``STUDY_LONG_SIDE`` overrides it).
LONG_SIDE = 32
#: The datasets :func:`register_tasks` adds.
STUDY_DATASETS = ("walk", "early", "late", "long")

_MOVES = {"+": 1, "-": -1}


# --------------------------------------------------------------------------- rewards

def extract_decision(completion: str) -> Optional[str]:
    """The first non-blank character of a completion (the decision), or ``None`` for an empty one."""
    s = completion.strip()
    return s[0] if s else None


def extract_last(completion: str) -> Optional[str]:
    """The last non-blank character of a completion, or ``None`` for an empty one."""
    s = completion.strip()
    return s[-1] if s else None


def extract_first_digit(completion: str) -> Optional[str]:
    """The first decimal digit anywhere in a completion, or ``None`` when there is none."""
    return next((ch for ch in completion if ch.isdigit()), None)


def _reward(extract, completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
    return [1.0 if extract(c) == str(a).strip() else 0.0 for c, a in zip(completions, answers)]


def early_decision_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where the completion's first character equals the reference decision, else 0.0.

    Everything after the first character (the filler) is ignored.
    """
    return _reward(extract_decision, completions, answers)


def late_decision_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where the completion's LAST non-blank character equals the reference decision, else 0.0."""
    return _reward(extract_last, completions, answers)


def first_digit_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where the first digit of the completion equals the reference decision, else 0.0 (the
    filler holds no digits, so in a well-formed completion that is the decisive middle token)."""
    return _reward(extract_first_digit, completions, answers)


# --------------------------------------------------------------------------- tasks

class DecisionTask(ChainTask):
    """A dial walk in the prompt; the completion is ``before`` ``=`` signs, the decision (the walk's
    end position), then ``after`` filler characters (the moves, repeated; see the module docstring).

    Inherits ``__init__``'s split drawing, ``heldout``, ``train`` and ``iter_train`` from
    :class:`ChainTask`: the held-out splits are disjoint from each other and from training.

    Args:
        num_ops: moves of the walk in the prompt (>= 1); there are ``10 * 2**num_ops`` distinct prompts.
        before, after: filler characters before / after the decision (>= 0 each).
        before_fill: what fills ``before``: ``"="`` signs or ``"moves"`` (the prompt's moves, repeated).
        data_seed: seed of the generator; with ``key``, the split name and the index it fixes a problem.
        heldout_sizes: sizes of the held-out splits excluded from training, e.g. ``{"test": 512, "val": 256}``.
        key: the generator's name (different tasks draw different problems from the same seed).
    """

    def __init__(self, num_ops: int = 8, before: int = 0, after: int = 24, data_seed: int = 1234,
                 heldout_sizes: Optional[dict] = None, key: str = "decision", before_fill: str = "="):
        if not isinstance(num_ops, int) or isinstance(num_ops, bool) or num_ops < 1:
            raise ValueError(f"num_ops must be a positive int, got {num_ops!r}")
        if before_fill not in ("=", "moves"):
            raise ValueError(f"before_fill must be '=' or 'moves', got {before_fill!r}")
        self.before_fill = before_fill
        for name, v in (("before", before), ("after", after)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.before, self.after, self.key = before, after, str(key)  # problem() needs them while the splits are drawn
        super().__init__(num_ops, data_seed, heldout_sizes)

    @property
    def completion_length(self) -> int:
        """Tokens of a full solution including the EOS token."""
        return self.before + 1 + self.after + 1

    @property
    def decision_index(self) -> int:
        """Position of the decisive character in a full solution (0-based)."""
        return self.before

    def problem(self, split: str, index: int) -> ChainProblem:
        """Problem ``index`` of ``split`` (a pure function of ``key``, ``data_seed``, ``split`` and ``index``)."""
        rng = random.Random(f"{self.key}:{self.data_seed}:{split}:{index}")
        r = rng.randrange(10)
        ops = [rng.choice("+-") for _ in range(self.num_ops)]
        prompt = str(r) + "".join(ops) + "?"
        for op in ops:
            r = (r + _MOVES[op]) % 10
        moves = "".join(ops) * -(-max(self.before, self.after) // self.num_ops)  # the moves, repeated
        before = "=" * self.before if self.before_fill == "=" else moves[:self.before]
        return ChainProblem(prompt, before + str(r) + moves[:self.after], str(r))


class EarlyDecisionTask(DecisionTask):
    """The first completion token decides (``before = 0``), then ``filler_length`` filler tokens.

    Its held-out splits are drawn like ChainTask's: ``test`` first, then ``val`` excluding
    ``test``, so the two are disjoint (before that fix, ``val`` was drawn independently and shared
    about 10% of ``test``'s prompts; the first study's early-task results predate it).
    """

    def __init__(self, num_ops: int = 8, filler_length: int = 24, data_seed: int = 1234,
                 heldout_sizes: Optional[dict] = None):
        if not isinstance(filler_length, int) or isinstance(filler_length, bool) or filler_length < 1:
            raise ValueError(f"filler_length must be a positive int, got {filler_length!r}")
        self.filler_length = filler_length
        super().__init__(num_ops, 0, filler_length, data_seed, heldout_sizes, key="early")


class LateDecisionTask(DecisionTask):
    """The control: ``filler_length`` filler tokens, then the decision as the LAST token.

    The filler is ``=`` signs (``before_fill="="``, the default) or the prompt's moves, repeated
    (``"moves"``: a variant whose warm-up stayed at chance; see the module docstring).
    """

    def __init__(self, num_ops: int = 8, filler_length: int = 24, data_seed: int = 1234,
                 heldout_sizes: Optional[dict] = None, before_fill: str = "="):
        if not isinstance(filler_length, int) or isinstance(filler_length, bool) or filler_length < 1:
            raise ValueError(f"filler_length must be a positive int, got {filler_length!r}")
        self.filler_length = filler_length
        super().__init__(num_ops, filler_length, 0, data_seed, heldout_sizes, key="late", before_fill=before_fill)


class LongDecisionTask(DecisionTask):
    """A long completion (``2 * side + 1`` characters + EOS) whose MIDDLE token decides."""

    def __init__(self, num_ops: int = 8, side: int = LONG_SIDE, data_seed: int = 1234,
                 heldout_sizes: Optional[dict] = None):
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise ValueError(f"side must be a positive int, got {side!r}")
        super().__init__(num_ops, side, side, data_seed, heldout_sizes, key="long")


# --------------------------------------------------------------------------- sources and registration

def eval_split() -> str:
    """The held-out split the study sources evaluate on in this process: ``STUDY_EVAL_SPLIT``
    (``"test"`` when unset; ``"val"`` in the runner's learning-rate selection runs)."""
    split = os.environ.get("STUDY_EVAL_SPLIT", "") or "test"
    if split not in ("test", "val"):
        raise ValueError(f"STUDY_EVAL_SPLIT must be 'test' or 'val', got {split!r}")
    return split


class SplitSource(SyntheticSource):
    """:class:`~creditlib.rl.data.SyntheticSource` whose ``heldout(n)`` serves ``split`` (``"test"``
    or ``"val"``); ``validation(n)`` (the warm-up's early stop) always serves ``val``."""

    def __init__(self, task, tokenizer, split: str = "test"):
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        super().__init__(task, tokenizer)
        self.split = split

    def heldout(self, n: int):
        return [self._ex(p) for p in self.task.heldout(self.split, n)]


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        v = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a positive int, got {raw!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {raw!r}")
    return v


def _heldout(cfg) -> dict:
    return {"test": cfg.eval_size, "val": 256}


def _build_walk(cfg, tokenizer):
    return SplitSource(ChainTask(cfg.num_ops, cfg.data_seed, _heldout(cfg)), tokenizer, eval_split())


def _build_early(cfg, tokenizer):
    """The prompt source of ``--dataset early`` for a recipe config (filler: ``STUDY_EARLY_FILLER``)."""
    task = EarlyDecisionTask(cfg.num_ops, _int_env("STUDY_EARLY_FILLER", EARLY_FILLER), cfg.data_seed, _heldout(cfg))
    return SplitSource(task, tokenizer, eval_split())


def _build_late(cfg, tokenizer):
    task = LateDecisionTask(cfg.num_ops, _int_env("STUDY_EARLY_FILLER", EARLY_FILLER), cfg.data_seed, _heldout(cfg))
    return SplitSource(task, tokenizer, eval_split())


def _build_long(cfg, tokenizer):
    task = LongDecisionTask(cfg.num_ops, _int_env("STUDY_LONG_SIDE", LONG_SIDE), cfg.data_seed, _heldout(cfg))
    return SplitSource(task, tokenizer, eval_split())


def _walk_reward(completions, answers):
    from creditlib.rl.task import chain_reward

    return chain_reward(completions, answers)


def register_tasks() -> None:
    """Make ``--dataset walk | early | late | long`` available to the recipes in this process
    (idempotent): one :func:`creditlib.rl.registry.register_dataset` call per task."""
    from creditlib.rl.registry import register_dataset

    register_dataset("walk", _build_walk, reward=_walk_reward, embedded=True, overwrite=True,
                     description="learning study: the embedded dial walk ('synthetic'), held-out split from "
                                 "STUDY_EVAL_SPLIT (test | val)")
    register_dataset(EARLY_DATASET, _build_early, reward=early_decision_reward, embedded=True, overwrite=True,
                     description="learning study: a dial walk whose answer is the FIRST completion token, then filler "
                                 f"tokens (STUDY_EARLY_FILLER, default {EARLY_FILLER}) that do not affect the reward")
    register_dataset("late", _build_late, reward=late_decision_reward, embedded=True, overwrite=True,
                     description="learning study (control): filler tokens (the prompt's moves repeated; "
                                 f"STUDY_EARLY_FILLER, default {EARLY_FILLER}), then the answer as the LAST "
                                 "completion token")
    register_dataset("long", _build_long, reward=first_digit_reward, embedded=True, overwrite=True,
                     description=f"learning study: {LONG_SIDE} '=' tokens (STUDY_LONG_SIDE), the answer, {LONG_SIDE} "
                                 "filler moves: a 66-token completion whose middle token decides")
