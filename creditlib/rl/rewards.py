"""Reward glue: any ``fn(completions, answers) -> list[float]`` made safe for a training loop.

:class:`SafeReward` calls the reward function with a time limit; a sample whose reward raises,
hangs past the limit, or returns something that is not a finite number is marked wrong (0.0) and
counted, and the run continues. The whole batch is tried in one call first (fast path); if that
call fails, every sample is retried alone so one bad sample costs only itself.

One time limit per reward, never two stacked:

* a reward that bounds its own time (a function attribute ``bounded_time = True`` and a
  ``timeout=`` keyword: the math reward :func:`creditlib.eval.rewards.accuracy_reward`, which
  runs math-verify in worker processes and kills one that overruns) is given ``timeout`` and is
  not wrapped in a second alarm (an alarm would interrupt the verifier pool mid-batch and force it
  to restart its workers);
* any other reward (the embedded tasks' string comparisons, a user's function) is guarded here:
  ``SIGALRM`` in the main thread (which also interrupts pure-Python busy loops) and a watchdog
  thread elsewhere (which abandons, but cannot stop, a hung call).

Which reward a dataset uses is looked up in the registry (:mod:`creditlib.rl.registry`).
"""

from __future__ import annotations

import math
import signal
import threading
import warnings
from typing import Callable, List, Sequence, Tuple

import torch

__all__ = ["SafeReward", "reward_for_dataset"]


class _Timeout(BaseException):  # BaseException: a reward function's `except Exception` cannot swallow it
    pass


def _call_with_timeout(fn: Callable, args: tuple, timeout: float):
    """Run ``fn(*args)``; raise ``_Timeout`` after ``timeout`` seconds."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def handler(signum, frame):
            raise _Timeout()

        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _as_reward(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


class SafeReward:
    """Wrap ``fn(completions: list[str], answers: list[str]) -> list[float]`` so it never stops training.

    Args:
        fn: the reward function (one float per completion).
        timeout: seconds allowed per sample (the batched fast path gets ``timeout * max(1, len/8)``).
            A reward with ``fn.bounded_time = True`` receives it as ``timeout=`` and enforces it
            itself (see the module docstring).

    Calling it returns ``(rewards [B] float32, stats)`` with ``stats = {"reward_errors": n,
    "reward_timeouts": n}`` for this batch.
    """

    def __init__(self, fn: Callable[[List[str], List[str]], Sequence[float]], timeout: float = 5.0):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.fn, self.timeout = fn, float(timeout)
        self.bounded_time = bool(getattr(fn, "bounded_time", False))
        self.total_errors = 0
        self.total_timeouts = 0
        self._warned = False

    def _call(self, completions: List[str], answers: List[str], limit: float):
        if self.bounded_time:  # the reward enforces self.timeout per sample itself
            return self.fn(completions, answers, timeout=self.timeout)
        return _call_with_timeout(self.fn, (completions, answers), limit)

    def _one(self, c: str, a: str) -> Tuple[float, str]:
        try:
            out = self._call([c], [a], self.timeout)
            v = _as_reward(list(out)[0])
            return (v, "") if math.isfinite(v) else (0.0, "error")
        except _Timeout:
            return 0.0, "timeout"
        except Exception:  # noqa: BLE001 - a failing sample is a wrong sample
            return 0.0, "error"

    def __call__(self, completions: Sequence[str], answers: Sequence[str]):
        completions, answers = list(completions), list(answers)
        if len(completions) != len(answers):
            raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
        B = len(completions)
        vals, kinds = None, None
        try:
            out = self._call(completions, answers, self.timeout * max(1.0, B / 8))
            out = [_as_reward(v) for v in out]
            if len(out) == B and all(math.isfinite(v) for v in out):
                vals, kinds = out, [""] * B
        except _Timeout:
            pass
        except Exception:  # noqa: BLE001 - retried sample by sample below
            pass
        if vals is None:
            pairs = [self._one(c, a) for c, a in zip(completions, answers)]
            vals, kinds = [p[0] for p in pairs], [p[1] for p in pairs]
        n_err, n_to = kinds.count("error"), kinds.count("timeout")
        self.total_errors += n_err
        self.total_timeouts += n_to
        if (n_err or n_to) and not self._warned:
            warnings.warn(f"reward function failed on {n_err} sample(s) and timed out on {n_to} "
                          f"(each counted as wrong; the run continues)", RuntimeWarning, stacklevel=2)
            self._warned = True
        rewards = torch.tensor(vals, dtype=torch.float32)  # [B]
        return rewards, {"reward_errors": n_err, "reward_timeouts": n_to}


def reward_for_dataset(dataset: str) -> Callable[[List[str], List[str]], List[float]]:
    """The verifiable reward of a ``--dataset`` value, from the registry (:mod:`creditlib.rl.registry`):
    exact final digit for ``synthetic``; math-verify for ``gsm8k``, ``math`` and local files."""
    from .registry import get_dataset

    return get_dataset(dataset).reward
