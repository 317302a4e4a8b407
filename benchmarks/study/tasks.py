"""Extra synthetic tasks for the learning study (``benchmarks/learning_study.py``).

They reach the recipes through the task registry, ONE :func:`~creditlib.rl.registry.register_dataset`
call per task, all made by :func:`register_tasks` in the runner's child processes before the recipe
parses its command line::

    from study.tasks import register_tasks
    register_tasks()            # --dataset walk | early | late | long | distractor-F | multi-decision-* now work

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

Study 3 (issue 20) adds tasks where credit assignment should be the bottleneck: several uncertain
tokens per completion, of which only some matter (``num_ops = 10`` for ``distractor``, 8 for ``multi``):

=========================  ========================================  =========================  ============
dataset                    completion                                reward                     tokens
=========================  ========================================  =========================  ============
``distractor-F``           every step of the walk, then F free       the digit after the last   10 (F + 1) + 3
                           ``+``/``-`` tokens; ``=``, answer          ``=`` (free tokens unread)
``multi-decision-count``   K = 4 times: 2 ``=``, the position        fraction of the K right    13
                           after the next num_ops / K moves
``multi-decision-all``     the same problems                         1 only if all K are right  13
=========================  ========================================  =========================  ============

* ``distractor-F`` (:class:`DistractorTask`, F in :data:`DISTRACTOR_FREE`; ``distractor-0`` is
  ``walk``): the demonstrations' free tokens are uniform random, so the warmed-up model is uncertain
  at ``num_ops * F`` tokens the reward ignores; a sweep over F shows how GRPO's steps grow with them.
* ``multi-decision-*`` (:class:`MultiDecisionTask`): K decisive tokens at different positions, each
  computed in one token (no written steps); the reward counts them or requires all.

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

**The multi-turn task.** :func:`register_tasks` also registers the environment ``dial-walk-study``
(:data:`STUDY_ENV`; ``--env dial-walk-study``): the bundled dial walk
(:class:`creditlib.rl.envs.DialWalkEnv`, its process score and its 90 (start, target) pairs), whose
source (:class:`DialWalkSplitSource`) serves the ``test`` pairs (20) as ``heldout(n)``, or the ``val``
pairs (10) under ``STUDY_EVAL_SPLIT=val``; ``validation(n)`` (the warm-up's early stop) always serves
``val``. Both are capped by the pair counts whatever ``--eval-size`` asks.
"""

from __future__ import annotations

import functools
import os
import random
from typing import List, Optional, Sequence

from creditlib.rl.data import SyntheticSource
from creditlib.rl.envs import DialWalkEnv, DialWalkScorer, DialWalkSource
from creditlib.rl.task import ChainProblem, ChainTask

__all__ = ["DecisionTask", "EarlyDecisionTask", "LateDecisionTask", "LongDecisionTask", "SplitSource",
           "early_decision_reward", "late_decision_reward", "first_digit_reward", "extract_decision",
           "extract_last", "extract_first_digit", "register_tasks", "eval_split", "STUDY_DATASETS",
           "EARLY_DATASET", "EARLY_FILLER", "LONG_SIDE",
           "DistractorTask", "MultiDecisionTask", "distractor_reward", "extract_decisions", "count_decisions_reward",
           "all_decisions_reward", "DECISION_DATASETS", "CREDIT_DATASETS", "DISTRACTOR_FREE", "MULTI_DECISIONS",
           "MULTI_GAP", "distractor_name", "DialWalkSplitSource", "STUDY_ENV"]

#: The ``--dataset`` name of the early-decision task, and its default filler length (the
#: environment variable ``STUDY_EARLY_FILLER`` overrides it in a run; it also sets ``late``'s).
EARLY_DATASET = "early"
EARLY_FILLER = 24
#: Filler tokens on EACH side of the decision in ``long`` (``STUDY_LONG_SIDE`` overrides it).
LONG_SIDE = 32
#: Free tokens per step of the registered ``distractor-F`` variants (one dataset name per F).
DISTRACTOR_FREE = (0, 2, 4, 8, 16)
#: Decisions of ``multi-decision-*`` (``STUDY_MULTI_DECISIONS`` overrides) and the ``=`` signs before each.
MULTI_DECISIONS = 4
MULTI_GAP = 2


def distractor_name(free: int) -> str:
    """The ``--dataset`` name of the distractor task with ``free`` free tokens per step."""
    return f"distractor-{int(free)}"


#: The tasks of the first two studies: where the one decisive token sits.
DECISION_DATASETS = ("walk", "early", "late", "long")
#: Study 3's tasks where credit assignment should be the bottleneck (issue 20): free high-entropy
#: tokens the reward ignores (``distractor-F``), several decisive tokens counted / all required.
CREDIT_DATASETS = tuple(distractor_name(f) for f in DISTRACTOR_FREE) + ("multi-decision-count", "multi-decision-all")
#: The datasets :func:`register_tasks` adds, in its order (one register_dataset call each).
STUDY_DATASETS = DECISION_DATASETS + CREDIT_DATASETS
#: The multi-turn environment :func:`register_tasks` adds (one register_env call): ``--env dial-walk-study``.
STUDY_ENV = "dial-walk-study"

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


# --------------------------------------------------------------------------- tasks where credit is the bottleneck

def distractor_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """The walk's reward (:func:`creditlib.rl.task.chain_reward`): 1.0 where the text after the last
    ``=`` equals the reference answer, else 0.0. The free tokens (and the written steps) before the
    ``=`` are never read, so every choice there is accepted."""
    from creditlib.rl.task import chain_reward

    return chain_reward(completions, answers)


def extract_decisions(completion: str, k: int) -> List[str]:
    """The first ``k`` decimal digits of a completion, in order (fewer when it has fewer): the
    decisions of :class:`MultiDecisionTask` (its filler holds no digit)."""
    out: List[str] = []
    for ch in completion:
        if ch.isdigit():
            out.append(ch)
            if len(out) == k:
                break
    return out


def _decision_hits(completions: Sequence[str], answers: Sequence[str]) -> List[tuple]:
    """``(right, K)`` per completion: how many of the ``K = len(answer)`` decisions it got right (the
    ``k``-th digit of the completion against the answer's ``k``-th digit; a missing digit is wrong)."""
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
    out = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        a = str(a).strip()
        if not a or not a.isdigit():
            raise ValueError(f"answers[{i}] must be a non-empty string of digits (one per decision), got {a!r}")
        got = extract_decisions(c, len(a))
        out.append((sum(1 for x, y in zip(got, a) if x == y), len(a)))
    return out


def count_decisions_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """The fraction of decisions right: ``(1/K) sum_k [d_k == a_k]``, with ``d_k`` the completion's
    ``k``-th digit and ``a_k`` the answer's (``K = len(answer)``); 0.25 steps for ``K = 4``."""
    return [right / k for right, k in _decision_hits(completions, answers)]


def all_decisions_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where ALL ``K`` decisions are right (``prod_k [d_k == a_k]``), else 0.0."""
    return [1.0 if right == k else 0.0 for right, k in _decision_hits(completions, answers)]


class DistractorTask(ChainTask):
    """The dial walk written step by step, with ``free`` free tokens (``+`` or ``-``) after every step.

    Prompt and answer are the walk's (:class:`creditlib.rl.task.ChainTask`: the same problems, in the
    same order, and the same held-out splits for the same ``num_ops`` and ``data_seed``; ``free = 0``
    IS the walk). The worked solution (``num_ops = 3``, ``free = 2``)::

        prompt    7+-+?
        solution  8-+7++8+-=8          (position 8, two free tokens, 7, two free, 8, two free; = answer)

    The reward (:func:`distractor_reward`) reads the answer after the last ``=`` only, so the free
    tokens never change it. In the demonstrations each free token is ``+`` or ``-`` with probability
    1/2, independently (its own generator), so a warmed-up model is uncertain there (entropy near
    ``ln 2 = 0.69`` nats at every free token) while the written steps and the answer are determined:
    a completion holds ``num_ops * free`` high-entropy tokens that do not matter beside the
    ``num_ops + 1`` that do. A plain GRPO update gives all of them the same advantage, so the free
    tokens get pushed with noise; credit that tells them apart gives them nothing.

    Args:
        num_ops: moves of the walk (>= 1).
        free: free tokens after every step (>= 0).
        data_seed, heldout_sizes: as :class:`ChainTask`.
    """

    def __init__(self, num_ops: int = 10, free: int = 4, data_seed: int = 1234, heldout_sizes: Optional[dict] = None):
        if not isinstance(free, int) or isinstance(free, bool) or free < 0:
            raise ValueError(f"free must be an int >= 0, got {free!r}")
        self.free = free  # problem() needs it while the splits are drawn
        super().__init__(num_ops, data_seed, heldout_sizes)

    @property
    def completion_length(self) -> int:
        """Tokens of a full solution including the EOS token: ``num_ops * (1 + free) + 3``."""
        return self.num_ops * (1 + self.free) + 3

    @property
    def free_indices(self) -> List[int]:
        """Positions of the free tokens in a full solution (0-based)."""
        return [j * (1 + self.free) + 1 + f for j in range(self.num_ops) for f in range(self.free)]

    @property
    def step_indices(self) -> List[int]:
        """Positions of the written steps (the position after each move) in a full solution."""
        return [j * (1 + self.free) for j in range(self.num_ops)]

    def problem(self, split: str, index: int) -> ChainProblem:
        """The walk's problem ``index`` of ``split`` with ``free`` random free tokens after every step."""
        p = super().problem(split, index)
        rng = random.Random(f"distractor-free:{self.data_seed}:{split}:{index}")
        steps = p.solution.rsplit("=", 1)[0]  # the position after every move
        body = "".join(d + "".join(rng.choice("+-") for _ in range(self.free)) for d in steps)
        return ChainProblem(p.prompt, body + "=" + p.answer, p.answer)


class MultiDecisionTask(ChainTask):
    """A dial walk in the prompt; the completion gives the dial's position at ``decisions`` checkpoints,
    each computed in one token (no written steps) and preceded by ``gap`` ``=`` signs.

    Decision ``k`` (``k = 1 .. K``) is the position after the first ``m_k = floor(k * num_ops / K)``
    moves; the answer is the ``K`` digits. With ``num_ops = 8``, ``K = 4``, ``gap = 2``::

        prompt    7++-++--+?             positions after moves 2, 4, 6, 8: 9, 9, 9, 8
        solution  ==9==9==9==8           answer 9998

    Several decisive tokens at different positions (``gap``, ``2 gap + 1``, ...), each uncertain
    for a warmed-up model. The reward counts the right ones (:func:`count_decisions_reward`:
    ``right / K``) or needs all of them (:func:`all_decisions_reward`); both variants draw the same
    problems (generator ``"multi-decision"``), so they differ only in the reward. A completion that
    is half right earns a single advantage in GRPO, shared by its right and its wrong decisions;
    credit must tell them apart.

    Args:
        num_ops: moves of the walk (>= ``decisions``).
        decisions: the number ``K`` of decisive tokens (>= 1).
        gap: ``=`` signs before each decision (>= 0).
        data_seed, heldout_sizes: as :class:`ChainTask` (splits disjoint from each other and from training).
    """

    def __init__(self, num_ops: int = 8, decisions: int = MULTI_DECISIONS, gap: int = MULTI_GAP,
                 data_seed: int = 1234, heldout_sizes: Optional[dict] = None):
        if not isinstance(num_ops, int) or isinstance(num_ops, bool) or num_ops < 1:
            raise ValueError(f"num_ops must be a positive int, got {num_ops!r}")
        if not isinstance(decisions, int) or isinstance(decisions, bool) or not 1 <= decisions <= num_ops:
            raise ValueError(f"decisions must be an int in [1, num_ops={num_ops}], got {decisions!r}")
        if not isinstance(gap, int) or isinstance(gap, bool) or gap < 0:
            raise ValueError(f"gap must be an int >= 0, got {gap!r}")
        self.decisions, self.gap, self.key = decisions, gap, "multi-decision"
        #: moves after which each decision reads the dial (strictly increasing, the last = num_ops)
        self.checkpoints = [(k + 1) * num_ops // decisions for k in range(decisions)]
        super().__init__(num_ops, data_seed, heldout_sizes)

    @property
    def completion_length(self) -> int:
        """Tokens of a full solution including the EOS token: ``K * (gap + 1) + 1``."""
        return self.decisions * (self.gap + 1) + 1

    @property
    def decision_indices(self) -> List[int]:
        """Positions of the decisive digits in a full solution (0-based)."""
        return [k * (self.gap + 1) + self.gap for k in range(self.decisions)]

    def problem(self, split: str, index: int) -> ChainProblem:
        """Problem ``index`` of ``split`` (a pure function of ``data_seed``, ``split`` and ``index``)."""
        rng = random.Random(f"{self.key}:{self.data_seed}:{split}:{index}")
        r = rng.randrange(10)
        ops = [rng.choice("+-") for _ in range(self.num_ops)]
        pos = [r]  # pos[m] = the dial after m moves
        for op in ops:
            pos.append((pos[-1] + _MOVES[op]) % 10)
        answer = "".join(str(pos[m]) for m in self.checkpoints)
        return ChainProblem(str(r) + "".join(ops) + "?", "".join("=" * self.gap + d for d in answer), answer)


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


class DialWalkSplitSource(DialWalkSource):
    """:class:`~creditlib.rl.envs.DialWalkSource` whose ``heldout(n)`` serves the ``split`` pairs
    (``"test"`` or ``"val"``); ``validation(n)`` (the warm-up's early stop) always serves ``val``."""

    def __init__(self, tokenizer, data_seed: int = 1234, split: str = "test"):
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        super().__init__(tokenizer, data_seed=data_seed)
        self.split = split

    def heldout(self, n: int):
        return self._split(self.split, n)


def _build_dial(cfg, tokenizer):
    """The problem source of ``--env dial-walk-study`` (``cfg`` ``None``: data seed 1234)."""
    return DialWalkSplitSource(tokenizer, data_seed=int(cfg.data_seed) if cfg is not None else 1234,
                               split=eval_split())


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


def _build_distractor(cfg, tokenizer, free: int):
    """The prompt source of ``--dataset distractor-F`` (``free = F``; the walk's ``cfg.num_ops``)."""
    return SplitSource(DistractorTask(cfg.num_ops, free, cfg.data_seed, _heldout(cfg)), tokenizer, eval_split())


def _build_multi(cfg, tokenizer):
    """The prompt source of ``--dataset multi-decision-count | multi-decision-all`` (decisions:
    ``STUDY_MULTI_DECISIONS``, default :data:`MULTI_DECISIONS`)."""
    task = MultiDecisionTask(cfg.num_ops, _int_env("STUDY_MULTI_DECISIONS", MULTI_DECISIONS), MULTI_GAP,
                             cfg.data_seed, _heldout(cfg))
    return SplitSource(task, tokenizer, eval_split())


def register_tasks() -> None:
    """Make every study dataset (:data:`STUDY_DATASETS`: ``walk | early | late | long``, then
    ``distractor-F`` for F in :data:`DISTRACTOR_FREE` and ``multi-decision-count | multi-decision-all``)
    available to the recipes in this process (idempotent): one
    :func:`creditlib.rl.registry.register_dataset` call per task; and the multi-turn environment
    :data:`STUDY_ENV` (``--env dial-walk-study``), one :func:`creditlib.rl.env.register_env` call."""
    from creditlib.rl.env import register_env
    from creditlib.rl.registry import register_dataset

    register_env(STUDY_ENV, DialWalkEnv, source=_build_dial, process_reward=DialWalkScorer(), overwrite=True,
                 description="learning study 3: the bundled dial walk (a move per turn, the environment restates "
                             "the target and the new position), held-out pairs from STUDY_EVAL_SPLIT (test | val)")

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
    for free in DISTRACTOR_FREE:
        register_dataset(distractor_name(free), functools.partial(_build_distractor, free=free),
                         reward=distractor_reward, embedded=True, overwrite=True,
                         description=f"learning study 3: the dial walk written step by step with {free} free '+'/'-' "
                                     "tokens after every step that the reward ignores (num_ops * "
                                     f"{free} high-entropy tokens that do not matter)")
    register_dataset("multi-decision-count", _build_multi, reward=count_decisions_reward, embedded=True,
                     overwrite=True,
                     description="learning study 3: the dial's position at K checkpoints of the walk (STUDY_MULTI_"
                                 f"DECISIONS, default {MULTI_DECISIONS}), each after {MULTI_GAP} '=' signs; reward = "
                                 "the fraction of the K decisions that are right")
    register_dataset("multi-decision-all", _build_multi, reward=all_decisions_reward, embedded=True, overwrite=True,
                     description="learning study 3: as multi-decision-count (the same problems), but the reward is 1 "
                                 "only when ALL K decisions are right")
