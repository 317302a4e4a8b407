"""Environments for multi-turn rollouts: the protocol, the safety guard, and the registry.

An episode alternates policy turns and environment observations::

    prompt | turn 0 (policy, ends with EOS) | observation 0 | turn 1 | observation 1 | ... | turn K-1

Protocol (one :class:`Environment` object per episode; a factory makes them):

* ``reset(example) -> Reset(observation, state_id)``: start the episode of ``example`` (a
  :class:`creditlib.rl.data.Example`). ``observation`` is text shown before turn 0 (usually ``""``:
  the prompt already says everything); ``state_id`` is the id of the state turn 0 starts from.
* ``step(action) -> Step(observation, reward, done, state_id)``: ``action`` is the decoded text of the
  policy's turn (special tokens skipped); ``reward`` the turn's reward; ``done`` ends the episode;
  ``observation`` is the environment's answer (appended to the transcript as tokens, masked: never
  trained on); ``state_id`` the id of the state the NEXT turn starts from.

State ids are ints ``>= 0`` (``-1``: unknown) and must be stable across processes: make them with
:func:`stable_state_id` (``hashlib``), never with ``hash()`` (salted per process for strings).
Equal ids are what the anchor-state credit (GiGPO) groups turns by.

Safety (:class:`SafeEnv`, the rollout's guard): a ``reset`` / ``step`` that raises, runs past
``timeout`` seconds, or returns something malformed raises :class:`EnvFailure` carrying the error
text; the rollout ends THAT episode (reward 0, ``failed``) and goes on. The time limit is the one of
:mod:`creditlib.rl.rewards` (``SIGALRM`` in the main thread, which interrupts ``time.sleep`` and
pure-Python loops; a watchdog thread elsewhere, which abandons but cannot stop a hung call).

Process rewards: a :class:`StepScorer` scores every turn (or step) of a finished episode; the
rollout adds ``process_coef * score`` to the turn rewards.

Registry: ``register_env(name, make_env, *, source, description, process_reward=None)``, one call per
environment, like :func:`creditlib.rl.registry.register_dataset`:

* ``make_env() -> Environment``: a zero-argument factory called once per episode (configure an
  environment with ``functools.partial(MyEnv, option=...)`` or a class with defaults). The same
  object is what :func:`creditlib.rl.multiturn.rollout_episodes` takes as ``make_env``.
* ``source(cfg, tokenizer) -> source``: the problem source (``next_batch / heldout / validation /
  encode / encode_sft`` like :class:`creditlib.rl.data.SyntheticSource`; ``encode_sft`` gives whole
  demonstration transcripts). ``cfg`` may be ``None`` (the source's defaults).

The bundled environments (``"dial-walk"``, ``"calculator"``) live in :mod:`creditlib.rl.envs` and are
registered when it is imported (:func:`get_env` and :func:`list_envs` import it, so there is no import
cycle: that module imports this one). This module imports no transformers.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Protocol, runtime_checkable

from .registry import normalize_name
from .rewards import _call_with_timeout, _Timeout

if TYPE_CHECKING:  # pragma: no cover
    from .data import Example

__all__ = ["Reset", "Step", "Environment", "StepScorer", "SafeEnv", "EnvFailure", "stable_state_id", "EnvSpec",
           "register_env", "get_env", "list_envs", "describe_envs"]


class Reset(NamedTuple):
    """What ``reset`` returns: the text shown before turn 0 (usually ``""``) and the id of the start state."""

    observation: str
    state_id: int


class Step(NamedTuple):
    """What ``step`` returns: the environment's answer (masked in the transcript), the turn's reward,
    whether the episode ended, and the id of the state the next turn starts from (``-1``: unknown)."""

    observation: str
    reward: float
    done: bool
    state_id: int


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (see the module docstring)."""

    def reset(self, example: "Example") -> Reset: ...

    def step(self, action: str) -> Step: ...


@runtime_checkable
class StepScorer(Protocol):
    """A process reward: one score per step of a finished episode.

    ``score(example, actions, observations) -> list[float]`` with ``len(actions)`` finite scores;
    ``actions[k]`` is turn ``k``'s decoded text and ``observations[k]`` the environment's answer to
    it. For a single-turn completion split into steps at ``boundary`` tokens, ``actions`` are the
    steps' texts and every observation is ``""``. The rollout adds ``process_coef * score[k]`` to
    ``turn_rewards[:, k]``.
    """

    def score(self, example: "Example", actions: List[str], observations: List[str]) -> List[float]: ...


def stable_state_id(*parts: Any) -> int:
    """A 63-bit id of ``parts`` that is the same in every process and on every machine.

    ``blake2b`` of the parts' ``repr`` joined by a separator (ints, strings and tuples of them have a
    stable ``repr``), so ``stable_state_id("dial-walk", 3, 7)`` never changes between runs, unlike
    ``hash()`` of a string. Always ``>= 0``.
    """
    h = hashlib.blake2b("\x1f".join(repr(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class EnvFailure(Exception):
    """An environment call raised, hung past its time limit, or returned a malformed value."""


def _check_state_id(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < -1:
        raise EnvFailure(f"{what} returned state_id={v!r}; expected an int >= -1 (-1: unknown)")
    return int(v)


class SafeEnv:
    """An :class:`Environment` whose calls cannot stop a rollout.

    Every call runs under a ``timeout``-second limit (:func:`creditlib.rl.rewards._call_with_timeout`);
    one that raises, overruns, or returns a malformed value (not a :class:`Reset` / :class:`Step`, or a
    4-tuple for ``step``; a non-string observation; a non-finite reward; a state id that is not an
    int ``>= -1``) raises :class:`EnvFailure` with the error text. ``done`` is read with ``bool()``.

    Args:
        make_env: zero-argument factory; called (under the same guard) by :meth:`reset`.
        timeout: seconds allowed per call (``> 0``).
    """

    def __init__(self, make_env: Callable[[], Environment], timeout: float = 5.0):
        if not callable(make_env):
            raise ValueError(f"make_env must be a zero-argument callable returning an Environment, "
                             f"got {type(make_env).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, Real) or not math.isfinite(timeout) or not timeout > 0:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.make_env, self.timeout = make_env, float(timeout)
        self.env: Optional[Environment] = None

    def _call(self, fn: Callable, args: tuple, what: str):
        try:
            return _call_with_timeout(fn, args, self.timeout)
        except _Timeout:
            raise EnvFailure(f"{what} timed out after {self.timeout:g} s") from None
        except Exception as e:  # noqa: BLE001 - any environment error ends the episode, not the run
            raise EnvFailure(f"{what} raised {type(e).__name__}: {str(e)[:300]}") from None

    def reset(self, example: "Example") -> Reset:
        """A fresh environment from the factory, reset on ``example``."""
        self.env = self._call(self.make_env, (), "make_env()")
        if not callable(getattr(self.env, "reset", None)) or not callable(getattr(self.env, "step", None)):
            raise EnvFailure(f"make_env() returned {type(self.env).__name__}, which has no reset/step methods")
        out = self._call(self.env.reset, (example,), "env.reset")
        if isinstance(out, tuple) and not isinstance(out, Reset) and len(out) == 2:
            out = Reset(*out)
        if not isinstance(out, Reset):
            raise EnvFailure(f"env.reset returned {type(out).__name__}; expected Reset(observation, state_id)")
        if not isinstance(out.observation, str):
            raise EnvFailure(f"env.reset returned a {type(out.observation).__name__} observation; expected str")
        return Reset(out.observation, _check_state_id(out.state_id, "env.reset"))

    def step(self, action: str) -> Step:
        if self.env is None:
            raise EnvFailure("step before reset")
        out = self._call(self.env.step, (action,), "env.step")
        if isinstance(out, tuple) and not isinstance(out, Step) and len(out) == 4:
            out = Step(*out)
        if not isinstance(out, Step):
            raise EnvFailure(f"env.step returned {type(out).__name__}; expected Step(observation, reward, done, "
                             "state_id)")
        if not isinstance(out.observation, str):
            raise EnvFailure(f"env.step returned a {type(out.observation).__name__} observation; expected str")
        try:
            reward = float(out.reward)
        except (TypeError, ValueError):
            raise EnvFailure(f"env.step returned reward={out.reward!r}; expected a finite number") from None
        if not math.isfinite(reward):
            raise EnvFailure(f"env.step returned reward={reward!r}; expected a finite number")
        return Step(out.observation, reward, bool(out.done), _check_state_id(out.state_id, "env.step"))

    def score(self, scorer: StepScorer, example: "Example", actions: List[str], observations: List[str]) -> List[float]:
        """``scorer.score(...)`` under the same guard: one finite float per action, else :class:`EnvFailure`."""
        out = self._call(scorer.score, (example, list(actions), list(observations)), "process_reward.score")
        try:
            vals = [float(v) for v in out]
        except (TypeError, ValueError):
            raise EnvFailure(f"process_reward.score returned {out!r}; expected a list of floats") from None
        if len(vals) != len(actions):
            raise EnvFailure(f"process_reward.score returned {len(vals)} scores for {len(actions)} turns")
        if not all(math.isfinite(v) for v in vals):
            raise EnvFailure(f"process_reward.score returned a non-finite score: {vals}")
        return vals


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EnvSpec:
    """One registered environment.

    Attributes:
        name: the registry key (normalised, :func:`creditlib.rl.registry.normalize_name`).
        make_env: ``make_env() -> Environment``, called once per episode.
        source: ``source(cfg, tokenizer) -> problem source`` (``cfg`` may be ``None``).
        description: one line for listings.
        process_reward: a :class:`StepScorer`, or ``None`` when the environment has no checkable steps.
        embedded: the environment's text uses the embedded char tokenizer's characters only, so the
            embedded tiny model runs it offline.
    """

    name: str
    make_env: Callable[[], Environment]
    source: Callable[[Any, Any], Any]
    description: str
    process_reward: Optional[StepScorer] = None
    embedded: bool = True

    def build_source(self, cfg, tokenizer):
        """The problem source for ``cfg`` (``None``: the source's defaults)."""
        return self.source(cfg, tokenizer)


_ENVS: Dict[str, EnvSpec] = {}


def register_env(name: str, make_env: Callable[[], Environment], *, source: Callable[[Any, Any], Any],
                 description: str, process_reward: Optional[StepScorer] = None, embedded: bool = True,
                 overwrite: bool = False) -> EnvSpec:
    """Register an environment under ``name`` (one call; see the module docstring).

    The name is normalised like dataset names (``"Dial_Walk"`` registers ``dial-walk``). Raises
    ``ValueError`` for an empty / spaced / path-like name, a name already registered (unless
    ``overwrite=True``), a ``make_env`` or ``source`` that is not callable, an empty description, or a
    ``process_reward`` without a ``score`` method.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    name = normalize_name(name)
    if any(c.isspace() for c in name):
        raise ValueError(f"name must not contain spaces, got {name!r}")
    if os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"name must not look like a file path, got {name!r}")
    if not callable(make_env):
        raise ValueError(f"make_env must be callable as make_env() -> Environment, got {type(make_env).__name__}")
    if not callable(source):
        raise ValueError(f"source must be callable as source(cfg, tokenizer), got {type(source).__name__}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string")
    if process_reward is not None and not callable(getattr(process_reward, "score", None)):
        raise ValueError(f"process_reward must have a score(example, actions, observations) method, "
                         f"got {type(process_reward).__name__}")
    if name in _ENVS and not overwrite:
        raise ValueError(f"environment {name!r} is already registered (names are compared after normalisation; "
                         "pass overwrite=True to replace it)")
    spec = EnvSpec(name, make_env, source, description.strip(), process_reward, bool(embedded))
    _ENVS[name] = spec
    return spec


def _load_builtins() -> None:
    from . import envs  # noqa: F401 - registers "dial-walk" and "calculator" on import


def list_envs() -> List[str]:
    """Registered environment names, in registration order (the bundled ones first)."""
    _load_builtins()
    return list(_ENVS)


def describe_envs() -> str:
    """``'name' (description); ...`` for every registered environment."""
    _load_builtins()
    return "; ".join(f"'{s.name}' ({s.description})" for s in _ENVS.values())


def get_env(name: str) -> EnvSpec:
    """The spec registered as ``name`` (normalised); an unknown name is a ``ValueError`` with the
    closest registered names ("did you mean ...")."""
    _load_builtins()
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"env must be a registered environment name, got {name!r}")
    key = normalize_name(name)
    if key in _ENVS:
        return _ENVS[key]
    close = difflib.get_close_matches(key, list(_ENVS), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"unknown environment {name!r}{hint}; registered: {list(_ENVS)}")
