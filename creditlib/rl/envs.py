"""The bundled environments, their problem sources, and the dial-walk's process reward.

Both write only the embedded char tokenizer's characters (:data:`creditlib.rl.task.CHAR_VOCAB`:
digits, ``+ - ? =`` and ``<eos>``), so the embedded tiny model runs them offline. Importing this
module registers them (:func:`creditlib.rl.env.register_env`):

``dial-walk`` (:class:`DialWalkEnv`): a 10-position dial, a target ``g`` and a start ``s != g``.
    Prompt ``"g?s"`` (target, ``?``, start: ``"3?7"`` = "get to 3; you are at 7"). Each turn the
    policy writes a move, ``"+"`` (one step up, mod 10) or ``"-"`` (one down), then EOS; the
    environment answers ``"g?p"``: the target restated, ``?``, the new position ``p`` (``"3?6"``).
    So every turn's context ends with the same local pattern as the prompt, ``target ? position``:
    the decision at turn ``k`` reads the same three characters whether ``k = 0`` (the prompt) or
    later (the previous observation). Any other action is an invalid move (position unchanged, the
    same ``g?p`` is answered). Reaching ``g`` ends the episode with reward 1; after ``max_turns =
    shortest distance + slack`` moves (``slack`` default 2) it is cut with reward 0. Every other step
    rewards 0. ``state_id = stable_state_id("dial-walk", position, g)``: positions repeat across a
    group (every episode of a prompt starts at ``s``) and within an episode (a ``+`` then a ``-``),
    so the anchor-state credit's groups are real.

    Transcripts (EOS written ``$``; the answer to the last turn is not in the row, see
    :mod:`creditlib.rl.multiturn`)::

        3?7  -$ 3?6 -$ 3?5 -$ 3?4 -$                       the shortest path (4 moves): reward 1
        3?7  +$ 3?8 +$ 3?9 +$ 3?0 =$ 3?0 +$ 3?1 +$         an invalid move ("="), 6 = 4 + 2 moves: cut at 2, reward 0

    Process reward (:class:`DialWalkScorer`, registered as the environment's checkable step score):
    a move scores 1 when it decreased the dial distance to ``g``, else 0.

    Problems: there are only 90 ``(s, g)`` pairs, so the held-out splits are a fixed subset of pairs
    (a permutation seeded by ``data_seed``: ``test`` 20 pairs, ``val`` 10), never used for training;
    training draws from the other 60 (``next_batch``: example ``i`` of the stream is seeded by
    ``(data_seed, "train", i)``). Demonstrations: the shortest path (at distance 5 both ways are
    shortest; the direction is seeded with the example). Half of the training demonstrations
    (``detour = 0.5``) start with a detour: one move the wrong way, replayed but not trained on
    (``EnvExample.explore = 1``: labels -100), then the shortest path from where it lands
    (``"3?7  +$ 3?8 -$ 3?7 -$ 3?6 -$ 3?5 -$ 3?4 -$"``: 6 moves, within the slack). Held-out demonstrations
    have none.

    What the held-out split measures. A held-out pair's first decision, at ``g?s``, is an
    intermediate state of training episodes (for ``data_seed`` 1234: 17 of the 20 ``test`` pairs,
    2 of the 10 ``val`` pairs, which are mostly at distance 4-5); the split tests whether the policy
    reads its decision from the current ``target ? position`` rather than from the episode's
    history. Both changes are needed for that (measured with the recipe's warm-up, 300 steps, the
    embedded model, ``data_seed`` 1234, seed 0, greedy success on the 20 ``test`` pairs): shortest
    paths only, old single-digit answers 0.75, restated target 0.75 (the model solves every training
    pair but copies its first move: in a shortest path every move repeats the first, so the
    direction rule is taught at turn 0 of the 60 training pairs only, and an unseen pair gets about
    the best constant policy, always ``+``: 0.67 with slack 2); with the detours, single-digit
    answers 0.95, restated target 1.00 (mean probability of the right first move 0.99 on ``test``,
    0.89 on ``val``: the one uncovered distance-1 ``val`` pair is missed). The uniform random policy
    gets 0.30.

    RL does not yet raise held-out success here (measured 2026-12-06, the recipe, 8 prompts x 8
    episodes, temperature 1, one or two seeds, 50-150 steps at lr 1e-4 / 3e-4 / 1e-3, ``turn-grpo``
    and ``grpo`` alike): greedy success on the ``test`` pairs stays at 0.55-0.65 (from warm-ups of
    40 or 100 steps, which start at 0.55-0.60); train success rises a little (0.51-0.62 -> 0.67-0.72
    from the 40-step warm-up). The policy settles on a constant first move (probability of ``+`` near
    0 or 1 for every pair). Why: with slack 2 a wrong first move followed by the way back still
    arrives (that is what the detour demonstrations show), and a constant policy succeeds on 0.67 of
    the pairs, so the outcome reward barely separates the right first move from the wrong one.

``calculator`` (:class:`CalculatorEnv`, tool use): a sum / difference of three two-digit numbers,
    prompt ``"47+38-12?"``. A policy turn ending in ``=`` is a calculator call: ``"47+38="`` is
    answered ``"85"`` (masked). The expression before ``=`` must be integers joined by ``+`` / ``-``
    (an optional leading ``-``; at most 10 terms of at most 9 digits); anything else is a bad call,
    answered ``"?"``. A turn without ``=`` is the final answer: the episode ends with reward 1 if it
    equals the value (``str(int)``, e.g. ``"-73"``), else 0. After ``max_turns`` (default 4) turns
    without an answer it is cut with reward 0. ``state_id = stable_state_id("calculator", prompt,
    tool answers so far)``. Demonstration: call, call, answer (``"47+38="``, ``"85-12="``, ``"73"``).
    Held-out ``test`` / ``val`` prompts are distinct and never drawn for training (as in
    :mod:`creditlib.rl.task`).

Sources (:class:`DialWalkSource`, :class:`CalculatorSource`) have the interface of
:class:`creditlib.rl.data.SyntheticSource` (``next_batch / heldout / validation / encode /
encode_sft``) plus ``make_env`` (the factory for :func:`creditlib.rl.multiturn.rollout_episodes`),
``max_turns`` and ``max_turn_tokens`` (the rollout settings the task needs). Their examples are
:class:`EnvExample`: an :class:`~creditlib.rl.data.Example` with the demonstration's ``actions``
(the first ``explore`` of them replayed but not trained on); ``solution`` is the demonstration
transcript as ``EpisodeBatch.texts`` shows it. ``encode_sft`` gives whole demonstration transcripts
(:func:`creditlib.rl.multiturn.encode_demonstrations`): the prompt, then each policy turn with its
EOS (labels on, except the ``explore`` first turns), the observations between turns (labels -100).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from numbers import Integral
from typing import Dict, List, Optional, Sequence, Tuple

from .data import Example, _Source
from .env import Reset, Step, register_env, stable_state_id

__all__ = ["EnvExample", "EnvSource", "DialWalkEnv", "DialWalkScorer", "DialWalkSource", "dial_distance",
           "parse_dial_prompt", "CalculatorEnv", "CalculatorSource", "evaluate_expression"]

_MOVES = {"+": 1, "-": -1}


@dataclass(frozen=True)
class EnvExample(Example):
    """An :class:`~creditlib.rl.data.Example` with a demonstration: the policy turns' texts (no EOS).
    The first ``explore`` actions are replayed (they are in the transcript, the later turns see them)
    but not trained on: :meth:`EnvSource.encode_sft` gives them labels -100."""

    actions: Tuple[str, ...] = ()
    explore: int = 0


def _nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


class EnvSource(_Source):
    """Base of the environments' problem sources: ``encode_sft`` replays each example's demonstration
    in a fresh environment and encodes the whole transcript."""

    make_env = None          # zero-argument factory of the environment
    max_turns: int = 1       # turns the rollout should allow
    max_turn_tokens: int = 1  # tokens per turn the rollout should allow (EOS included)

    def encode_sft(self, examples: List[Example], device=None):
        """``ids [K, L]`` (prompt + demonstration transcript, right padded), ``attn [K, L]``, ``labels [K, L]``
        (the policy turns' tokens and their EOS; -100 on the prompt, observations and padding)."""
        from .multiturn import encode_demonstrations

        ids, attn, labels = encode_demonstrations(self.tokenizer, self.make_env, examples,
                                                  add_special_tokens=self.add_special_tokens, device=device)
        eos = self.tokenizer.eos_token_id
        for i, e in enumerate(examples):  # the exploration turns: labels off up to their last EOS
            n = int(getattr(e, "explore", 0) or 0)
            if n:
                ends = ((labels[i] == eos) & (ids[i] == eos)).nonzero().flatten()  # [turns] each turn's EOS
                if not 0 < n < len(ends):
                    raise ValueError(f"example {i} ({e.prompt!r}): explore must be in [0, {len(ends)}) (its turns), "
                                     f"got {n}")
                labels[i, :int(ends[n - 1]) + 1] = -100
        return ids, attn, labels

    def _solution(self, prompt: str, answer: str, actions: Sequence[str], explore: int = 0) -> EnvExample:
        """The example with its demonstration; ``solution`` = the transcript text (actions and the
        observations between them, as ``EpisodeBatch.texts`` shows it)."""
        env = self.make_env()
        env.reset(Example(prompt, answer))
        parts = []
        for k, a in enumerate(actions):
            st = env.step(a)
            parts.append(a)
            if k < len(actions) - 1:
                if st.done:
                    raise ValueError(f"demonstration {list(actions)} of {prompt!r} ends the episode at turn {k}")
                parts.append(st.observation)
        if not 0 <= explore < len(actions):
            raise ValueError(f"explore must be in [0, {len(actions)}) for {prompt!r}, got {explore!r}")
        return EnvExample(prompt, answer, "".join(parts), tuple(actions), int(explore))


# ----------------------------------------------------------------------------- dial-walk
_DIAL_PROMPT = re.compile(r"(\d)\?(\d)")


def dial_distance(a: int, b: int) -> int:
    """Steps between two positions of the 10-position dial: ``min((a - b) mod 10, (b - a) mod 10)``."""
    return min((a - b) % 10, (b - a) % 10)


def parse_dial_prompt(prompt: str) -> Tuple[int, int]:
    """``"g?s"`` -> ``(g, s)``; ``ValueError`` for anything else."""
    m = _DIAL_PROMPT.fullmatch(prompt.strip()) if isinstance(prompt, str) else None
    if m is None:
        raise ValueError(f"dial-walk prompt must be 'g?s' (target digit, '?', start digit), got {prompt!r}")
    return int(m.group(1)), int(m.group(2))


class DialWalkEnv:
    """The dial-walk environment (see the module docstring).

    Args:
        slack: moves allowed beyond the shortest distance before the episode is cut (``>= 0``).
    """

    def __init__(self, slack: int = 2):
        self.slack = _nonneg_int("slack", slack)
        self.pos = self.goal = -1
        self.turn, self.max_turns, self.done = 0, 0, True

    def reset(self, example: Example) -> Reset:
        g, s = parse_dial_prompt(example.prompt)
        if g == s:
            raise ValueError(f"dial-walk start and target must differ, got {example.prompt!r}")
        self.goal, self.pos, self.turn, self.done = g, s, 0, False
        self.max_turns = dial_distance(s, g) + self.slack
        return Reset("", stable_state_id("dial-walk", s, g))

    def step(self, action: str) -> Step:
        if self.done:
            raise RuntimeError("dial-walk: step after the episode ended")
        self.pos = (self.pos + _MOVES.get(action.strip(), 0)) % 10
        self.turn += 1
        reward = 1.0 if self.pos == self.goal else 0.0
        self.done = self.pos == self.goal or self.turn >= self.max_turns
        return Step(f"{self.goal}?{self.pos}", reward, self.done, stable_state_id("dial-walk", self.pos, self.goal))


class DialWalkScorer:
    """The dial-walk's process reward: move ``k`` scores 1.0 if it decreased the dial distance to the
    target, else 0.0 (an invalid move leaves the distance unchanged: 0.0). The positions are replayed
    from the prompt and the actions (the observations are not needed)."""

    def score(self, example: Example, actions: List[str], observations: List[str]) -> List[float]:
        g, pos = parse_dial_prompt(example.prompt)
        out = []
        for a in actions:
            new = (pos + _MOVES.get(a.strip(), 0)) % 10
            out.append(1.0 if dial_distance(new, g) < dial_distance(pos, g) else 0.0)
            pos = new
        return out


_DIAL_PAIRS = [(s, g) for s in range(10) for g in range(10) if s != g]


class DialWalkSource(EnvSource):
    """Dial-walk problems (see the module docstring).

    Args:
        tokenizer: the embedded char tokenizer (or any tokenizer that has its characters).
        data_seed: fixes the held-out pairs and the training stream.
        heldout_sizes: pairs per held-out split, in order (default ``{"test": 20, "val": 10}``;
            at most 45 in all, so at least half of the 90 pairs are trained on).
        slack: the environment's slack (:class:`DialWalkEnv`).
        detour: the fraction of training demonstrations that start with a detour (one move the wrong
            way, not trained on, then the shortest path from there; needs ``slack >= 2``). 0: none.
    """

    def __init__(self, tokenizer, data_seed: int = 1234, heldout_sizes: Optional[Dict[str, int]] = None,
                 slack: int = 2, detour: float = 0.5):
        self.tokenizer, self.data_seed = tokenizer, int(data_seed)
        self.slack = _nonneg_int("slack", slack)
        if isinstance(detour, bool) or not isinstance(detour, (int, float)) or not 0.0 <= float(detour) <= 1.0:
            raise ValueError(f"detour must be a fraction in [0, 1], got {detour!r}")
        if detour > 0 and self.slack < 2:
            raise ValueError(f"detour > 0 needs slack >= 2 (a wrong move costs 2 moves), got slack={slack!r}")
        self.detour = float(detour)
        sizes = dict(heldout_sizes if heldout_sizes is not None else {"test": 20, "val": 10})
        for name, n in sizes.items():
            _nonneg_int(f"heldout_sizes[{name!r}]", n)
        if sum(sizes.values()) > len(_DIAL_PAIRS) // 2:
            raise ValueError(f"heldout_sizes {sizes} hold out more than half of the {len(_DIAL_PAIRS)} (start, target) "
                             "pairs; at most 45 in all")
        order = random.Random(f"{self.data_seed}:dial-walk:pairs").sample(_DIAL_PAIRS, len(_DIAL_PAIRS))
        self._heldout: Dict[str, List[Tuple[int, int]]] = {}
        i = 0
        for name, n in sizes.items():
            self._heldout[name] = order[i:i + n]
            i += n
        self.train_pairs: List[Tuple[int, int]] = sorted(order[i:])
        self.make_env = functools.partial(DialWalkEnv, self.slack)
        self.max_turns = 5 + self.slack  # the longest shortest path is 5 moves
        self.max_turn_tokens = 2         # a move and its EOS

    def heldout_pairs(self, split: str = "test") -> List[Tuple[int, int]]:
        """The ``(start, target)`` pairs of a held-out split."""
        if split not in self._heldout:
            raise ValueError(f"split must be one of {sorted(self._heldout)}, got {split!r}")
        return list(self._heldout[split])

    def example(self, s: int, g: int, rng: random.Random, detour: bool = False) -> EnvExample:
        """The problem ``s -> g`` with its shortest-path demonstration (a tie broken by ``rng``);
        ``detour``: first one move against that path (``explore = 1``: not trained on), then the
        shortest path from where it lands (a tie there broken by ``rng``)."""
        up, down = (g - s) % 10, (s - g) % 10
        move = "+" if up < down or (up == down and rng.random() < 0.5) else "-"
        if not detour:
            return self._solution(f"{g}?{s}", str(g), [move] * min(up, down))
        wrong = "-" if move == "+" else "+"
        p = (s + _MOVES[wrong]) % 10
        up, down = (g - p) % 10, (p - g) % 10
        back = "+" if up < down or (up == down and rng.random() < 0.5) else "-"
        return self._solution(f"{g}?{s}", str(g), [wrong] + [back] * min(up, down), explore=1)

    def next_batch(self, position: int, k: int) -> Tuple[List[EnvExample], int]:
        out = []
        for i in range(position, position + k):
            rng = random.Random(f"{self.data_seed}:train:{i}")
            s, g = rng.choice(self.train_pairs)
            out.append(self.example(s, g, rng, detour=rng.random() < self.detour))
        return out, position + k

    def _split(self, split: str, n: int) -> List[EnvExample]:
        pairs = self.heldout_pairs(split)[:n]
        return [self.example(s, g, random.Random(f"{self.data_seed}:{split}:{i}")) for i, (s, g) in enumerate(pairs)]

    def heldout(self, n: int) -> List[EnvExample]:
        """The first ``n`` test pairs (at most 20 by default: there are only 90 pairs)."""
        return self._split("test", n)

    def validation(self, n: int) -> List[EnvExample]:
        return self._split("val", n)


# ----------------------------------------------------------------------------- calculator
_CALL = re.compile(r"-?\d{1,9}(?:[+-]\d{1,9}){0,9}")
_TERM = re.compile(r"[+-]?\d+")


def evaluate_expression(expr: str) -> Optional[int]:
    """The value of ``expr`` (integers joined by ``+`` / ``-``, optional leading ``-``, at most 10
    terms of at most 9 digits), or ``None`` when it is not such an expression."""
    if not isinstance(expr, str) or _CALL.fullmatch(expr) is None:
        return None
    return sum(int(t) for t in _TERM.findall(expr))


class CalculatorEnv:
    """The calculator tool-use environment (see the module docstring).

    Args:
        max_turns: turns before an episode without a final answer is cut with reward 0 (``>= 1``).
    """

    BAD_CALL = "?"

    def __init__(self, max_turns: int = 4):
        if _nonneg_int("max_turns", max_turns) < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns!r}")
        self.max_turns = int(max_turns)
        self.prompt, self.answer, self.results, self.done = "", "", (), True

    def _state(self) -> int:
        return stable_state_id("calculator", self.prompt, self.results)

    def reset(self, example: Example) -> Reset:
        if not isinstance(example.prompt, str) or not example.prompt.endswith("?"):
            raise ValueError(f"calculator prompt must end with '?', got {example.prompt!r}")
        self.prompt, self.answer, self.results, self.done = example.prompt, str(example.answer).strip(), (), False
        return Reset("", self._state())

    def step(self, action: str) -> Step:
        if self.done:
            raise RuntimeError("calculator: step after the episode ended")
        action = action.strip()
        if not action.endswith("="):  # the final answer
            self.done = True
            return Step("", 1.0 if action == self.answer else 0.0, True, self._state())
        value = evaluate_expression(action[:-1])
        obs = self.BAD_CALL if value is None else str(value)
        self.results = self.results + (obs,)
        self.done = len(self.results) >= self.max_turns
        return Step(obs, 0.0, self.done, self._state())


class CalculatorSource(EnvSource):
    """Calculator problems: ``a o1 b o2 c ?`` with two-digit ``a, b, c`` and ``o1, o2`` in ``+ -``,
    seeded by ``(data_seed, split, index)``; the held-out splits are distinct prompts never drawn for
    training.

    Args:
        tokenizer: the embedded char tokenizer (or any tokenizer that has its characters).
        data_seed: seed of the generator.
        heldout_sizes: prompts per held-out split (default ``{"test": 256, "val": 128}``).
        max_turns: the environment's turn limit (:class:`CalculatorEnv`).
    """

    def __init__(self, tokenizer, data_seed: int = 1234, heldout_sizes: Optional[Dict[str, int]] = None,
                 max_turns: int = 4):
        self.tokenizer, self.data_seed = tokenizer, int(data_seed)
        self.make_env = functools.partial(CalculatorEnv, max_turns)
        self.make_env()  # validates max_turns
        self.max_turns = int(max_turns)
        self.max_turn_tokens = 8  # "-99-99=" and its EOS
        sizes = dict(heldout_sizes if heldout_sizes is not None else {"test": 256, "val": 128})
        self._heldout: Dict[str, List[EnvExample]] = {}
        self._excluded: set = set()
        for name, n in sizes.items():
            n = _nonneg_int(f"heldout_sizes[{name!r}]", n)
            out, i = [], 0
            while len(out) < n:
                e = self.problem(name, i)
                i += 1
                if e.prompt not in self._excluded:
                    self._excluded.add(e.prompt)
                    out.append(e)
            self._heldout[name] = out

    def problem(self, split: str, index: int) -> EnvExample:
        rng = random.Random(f"{self.data_seed}:calculator:{split}:{index}")
        a, b, c = (rng.randrange(10, 100) for _ in range(3))
        o1, o2 = rng.choice("+-"), rng.choice("+-")
        r1 = a + _MOVES[o1] * b
        r2 = r1 + _MOVES[o2] * c
        return self._solution(f"{a}{o1}{b}{o2}{c}?", str(r2), [f"{a}{o1}{b}=", f"{r1}{o2}{c}=", str(r2)])

    def next_batch(self, position: int, k: int) -> Tuple[List[EnvExample], int]:
        out, i = [], position
        while len(out) < k:
            e = self.problem("train", i)
            i += 1
            if e.prompt not in self._excluded:
                out.append(e)
        return out, i

    def _split(self, split: str, n: int) -> List[EnvExample]:
        if split not in self._heldout:
            raise ValueError(f"split must be one of {sorted(self._heldout)}, got {split!r}")
        return self._heldout[split][:n]

    def heldout(self, n: int) -> List[EnvExample]:
        return self._split("test", n)

    def validation(self, n: int) -> List[EnvExample]:
        return self._split("val", n)


# ----------------------------------------------------------------------------- registration
def _cfg_seed(cfg) -> int:
    return int(cfg.data_seed) if cfg is not None else 1234


def _dial_source(cfg, tokenizer) -> DialWalkSource:
    return DialWalkSource(tokenizer, data_seed=_cfg_seed(cfg))


def _calculator_source(cfg, tokenizer) -> CalculatorSource:
    sizes = {"test": int(cfg.eval_size), "val": 128} if cfg is not None else None
    return CalculatorSource(tokenizer, data_seed=_cfg_seed(cfg), heldout_sizes=sizes)


register_env("dial-walk", DialWalkEnv, source=_dial_source, process_reward=DialWalkScorer(),
             description="walk a 10-position dial to a target one move (+/-) per turn; 90 (start, target) pairs")
register_env("calculator", CalculatorEnv, source=_calculator_source,
             description="tool use: a sum of three two-digit numbers with calculator calls ('47+38=' -> '85')")
