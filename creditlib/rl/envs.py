"""The bundled environments, their problem sources, and the dial-walk's process reward.

Both write only the embedded char tokenizer's characters (:data:`creditlib.rl.task.CHAR_VOCAB`:
digits, ``+ - ? =`` and ``<eos>``), so the embedded tiny model runs them offline. Importing this
module registers them (:func:`creditlib.rl.env.register_env`):

``dial-walk`` (:class:`DialWalkEnv`): a 10-position dial, a target ``g`` and a start ``s != g``.
    Prompt ``"g?s"`` (target, ``?``, start: ``"3?7"`` = "get to 3; you are at 7"), chosen so that
    every turn starts right after the digit of the current position (the prompt's last character
    for turn 0, the previous observation after that) and the target always sits at the same place.
    Each turn the policy writes a move, ``"+"`` (one step up, mod 10) or ``"-"`` (one down), then EOS;
    the environment answers with the new position (one digit). Any other action is an invalid move
    (position unchanged, the same digit is answered). Reaching ``g`` ends the episode with reward 1;
    after ``max_turns = shortest distance + slack`` moves (``slack`` default 2) it is cut with
    reward 0. Every other step rewards 0. ``state_id = stable_state_id("dial-walk", position, g)``:
    positions repeat across a group (every episode of a prompt starts at ``s``) and within an
    episode (a ``+`` then a ``-``), so the anchor-state credit's groups are real.

    Transcripts (EOS written ``$``; the answer to the last turn is not in the row, see
    :mod:`creditlib.rl.multiturn`)::

        3?7  -$ 6 -$ 5 -$ 4 -$                 the shortest path (4 moves): reward 1
        3?7  +$ 8 +$ 9 +$ 0 =$ 0 +$ 1 +$       an invalid move ("="), 6 = 4 + 2 moves: cut at 2, reward 0

    Process reward (:class:`DialWalkScorer`, registered as the environment's checkable step score):
    a move scores 1 when it decreased the dial distance to ``g``, else 0.

    Problems: there are only 90 ``(s, g)`` pairs, so the held-out splits are a fixed subset of pairs
    (a permutation seeded by ``data_seed``: ``test`` 20 pairs, ``val`` 10), never used for training;
    training draws from the other 60 (``next_batch``: example ``i`` of the stream is seeded by
    ``(data_seed, "train", i)``). Held-out start pairs are new, but their intermediate states
    (position, target) also occur in training episodes with the same target: the split tests the
    turn-0 decision in a new context, not unseen states. Demonstrations: the shortest path (at
    distance 5 both ways are shortest; the direction is seeded with the example).

    What the held-out split measures (measured, ``tests/test_multiturn.py``'s warm-up test): a tiny
    model warmed up on the demonstrations solves the 60 training pairs (greedy success 1.0) but
    reaches only 0.67-0.83 on the held-out pairs: about the best constant policy (always ``+``: 0.67,
    since with slack 2 the long way round still arrives at distance 4 and 5), well above the uniform
    random policy (0.30). In a shortest path every move after the first repeats the first, so the
    demonstrations teach the direction rule only at turn 0 of 60 pairs; an unseen pair's first move
    needs dial arithmetic the model does not get from them.

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
:class:`EnvExample`: an :class:`~creditlib.rl.data.Example` with the demonstration's ``actions``;
``solution`` is the demonstration transcript as ``EpisodeBatch.texts`` shows it. ``encode_sft`` gives
whole demonstration transcripts (:func:`creditlib.rl.multiturn.encode_demonstrations`): the prompt,
then each policy turn with its EOS (labels on), the observations between turns (labels -100).
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
    """An :class:`~creditlib.rl.data.Example` with a demonstration: the policy turns' texts (no EOS)."""

    actions: Tuple[str, ...] = ()


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

        return encode_demonstrations(self.tokenizer, self.make_env, examples,
                                     add_special_tokens=self.add_special_tokens, device=device)

    def _solution(self, prompt: str, answer: str, actions: Sequence[str]) -> EnvExample:
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
        return EnvExample(prompt, answer, "".join(parts), tuple(actions))


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
        return Step(str(self.pos), reward, self.done, stable_state_id("dial-walk", self.pos, self.goal))


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
    """

    def __init__(self, tokenizer, data_seed: int = 1234, heldout_sizes: Optional[Dict[str, int]] = None,
                 slack: int = 2):
        self.tokenizer, self.data_seed = tokenizer, int(data_seed)
        self.slack = _nonneg_int("slack", slack)
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

    def example(self, s: int, g: int, rng: random.Random) -> EnvExample:
        """The problem ``s -> g`` with its shortest-path demonstration (a tie broken by ``rng``)."""
        up, down = (g - s) % 10, (s - g) % 10
        move = "+" if up < down or (up == down and rng.random() < 0.5) else "-"
        return self._solution(f"{g}?{s}", str(g), [move] * min(up, down))

    def next_batch(self, position: int, k: int) -> Tuple[List[EnvExample], int]:
        out = []
        for i in range(position, position + k):
            rng = random.Random(f"{self.data_seed}:train:{i}")
            s, g = rng.choice(self.train_pairs)
            out.append(self.example(s, g, rng))
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
