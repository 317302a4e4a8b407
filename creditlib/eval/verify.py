"""Answer verification with a hard time limit that works from any thread.

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread and
in whole seconds. Here every check runs in a small pool of persistent worker processes
(:mod:`creditlib.eval._verify_worker`, started once, reused for every call):

* the worker bounds each check with a sub-second interval timer (the soft limit, 80% of
  ``timeout``), which covers almost all slow cases and keeps the worker alive;
* the parent waits at most ``timeout`` seconds for the reply; if none comes (work stuck in C
  code, e.g. a huge integer power) it kills the worker (SIGKILL), answers ``False`` and starts a
  replacement in the background;
* workers have an address-space limit, so a runaway computation fails with MemoryError instead
  of exhausting the machine.

So :func:`is_correct` returns within about ``timeout`` seconds whatever the text, from the main
thread, a worker thread or inside a training loop, and never raises. The cost per check is the
math-verify work plus one local socket round trip (tens of microseconds); batches are spread
over the workers in parallel (:func:`is_correct_batch`).

Model text is never evaluated: extraction (:mod:`creditlib.eval.extract`) is string scanning,
and only math-verify's own parser (an ANTLR LaTeX grammar, and sympy's ``parse_expr`` on strings
its regular expressions restricted to digits and arithmetic operators) sees the answer.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait as _wait_conns
from typing import Sequence

from .extract import extract_answer

__all__ = ["is_correct", "is_correct_batch", "VerifierPool", "default_pool", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Default per-answer time limit in seconds.
DEFAULT_TIMEOUT = 5.0
_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
_STARTUP_TIMEOUT = 120.0  # seconds a new worker may take to import sympy/math-verify


class _Worker:
    __slots__ = ("proc", "conn", "ready", "dead")

    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.dead = False

    def kill(self) -> None:
        self.dead = True
        try:
            self.proc.kill()
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass


class VerifierPool:
    """A pool of persistent math-verify worker processes with hard per-check time limits.

    Args:
        num_workers: processes to keep (default: ``CREDITLIB_VERIFY_WORKERS`` or
            ``min(4, cpu_count)``). Checks of one batch run in parallel across them.
        max_memory_mb: address-space limit per worker (0 = none).

    Thread-safe: any number of threads may call :meth:`check` at once; each worker serves one
    call at a time. Use :func:`default_pool` rather than building pools in a loop.
    """

    def __init__(self, num_workers: int | None = None, max_memory_mb: int = 4096):
        if num_workers is None:
            env = os.environ.get("CREDITLIB_VERIFY_WORKERS")
            num_workers = int(env) if env else min(4, os.cpu_count() or 1)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not isinstance(max_memory_mb, int) or max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be an int >= 0, got {max_memory_mb!r}")
        self.num_workers = num_workers
        self.max_memory_mb = max_memory_mb
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._closed = False
        self._failed_starts = 0
        self.kills = 0  # workers killed at the hard deadline (for diagnostics)
        for _ in range(num_workers):
            self._spawn()

    # ------------------------------------------------------------------ worker lifecycle
    def _spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        try:
            proc = subprocess.Popen(
                [sys.executable, _WORKER_PATH, str(child_sock.fileno()), str(self.max_memory_mb)],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except Exception:
            parent_sock.close()
            child_sock.close()
            with self._cond:
                self._failed_starts += 1
                self._cond.notify_all()
            logger.exception("creditlib.eval: could not start a verification worker")
            return
        child_sock.close()
        w = _Worker(proc, Connection(parent_sock.detach()))
        with self._cond:
            self._all.add(w)
        threading.Thread(target=self._await_ready, args=(w,), daemon=True, name="creditlib-verify-start").start()

    def _await_ready(self, w: _Worker) -> None:
        ok = False
        try:
            if w.conn.poll(_STARTUP_TIMEOUT):
                ok = w.conn.recv_bytes() == b'"ready"'
        except Exception:
            ok = False
        with self._cond:
            if ok and not self._closed:
                w.ready = True
                self._idle.append(w)
                self._failed_starts = 0
            else:
                self._all.discard(w)
                if not self._closed:
                    self._failed_starts += 1
                    logger.error("creditlib.eval: a verification worker failed to start")
            self._cond.notify_all()
        if not ok or self._closed:
            w.kill()

    def _retire(self, w: _Worker, respawn: bool = True) -> None:
        w.kill()
        with self._cond:
            self._all.discard(w)
        if respawn and not self._closed:
            self._spawn()

    def _acquire(self, block_s: float) -> _Worker | None:
        """An idle worker, waiting up to ``block_s`` seconds; None if none became idle."""
        deadline = time.monotonic() + block_s
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("VerifierPool is closed")
                while self._idle:
                    w = self._idle.pop()
                    if w.proc.poll() is None:
                        return w
                    self._all.discard(w)  # died while idle: replace it below
                    threading.Thread(target=self._spawn, daemon=True).start()
                if not self._all and self._failed_starts >= 3:
                    raise RuntimeError("creditlib.eval: verification workers cannot be started")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if self._closed:
                w.kill()
                return
            self._idle.append(w)
            self._cond.notify()

    # ------------------------------------------------------------------ public
    def check(self, pairs: Sequence[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT,
              exact_match: bool = True) -> list[bool]:
        """Verify extracted answers against gold answers: ``pairs`` of (prediction, gold)
        strings -> list of bools. Each pair gets at most ``timeout`` seconds of worker time;
        pairs run in parallel across idle workers. ``exact_match=False`` skips the canonical
        string comparison and decides by math-verify alone (used by the self-check). Raises
        only if the pool cannot work at all."""
        timeout = float(timeout)
        n = len(pairs)
        results = [False] * n
        pending = collections.deque(range(n))
        inflight: dict[Connection, tuple[_Worker, int, float]] = {}
        # A job waiting for a worker (all busy in other threads, or restarting) gives up after
        # this long: it is answered False rather than blocking the caller without bound.
        give_up = time.monotonic() + (n + 1) * timeout + _STARTUP_TIMEOUT
        try:
            self._run(pairs, timeout, results, pending, inflight, give_up, bool(exact_match))
        finally:
            # Interrupted (KeyboardInterrupt, a caller's own alarm, ...): the workers still
            # holding jobs may answer later; their state is unknown, so replace them.
            for w, _, _ in list(inflight.values()):
                self._retire(w)
            inflight.clear()
        return results

    def _run(self, pairs, timeout, results, pending, inflight, give_up, exact) -> None:
        while pending or inflight:
            while pending:
                w = self._acquire(0.0 if inflight else 0.05)
                if w is None:
                    break
                idx = pending.popleft()
                pred, gold = pairs[idx]
                try:
                    w.conn.send_bytes(json.dumps([idx, pred, gold, 0.8 * timeout, exact]).encode())
                except (OSError, ValueError):  # worker died while idle: requeue the job
                    pending.appendleft(idx)
                    self._retire(w)
                    continue
                inflight[w.conn] = (w, idx, time.monotonic() + timeout)
            if not inflight:
                if time.monotonic() > give_up:
                    logger.error("creditlib.eval: no verification worker became available; answering False")
                    break
                continue
            now = time.monotonic()
            next_deadline = min(d for _, _, d in inflight.values())
            ready = _wait_conns(list(inflight), timeout=max(0.0, next_deadline - now))
            for conn in ready:
                w, idx, _ = inflight.pop(conn)
                try:
                    job_id, ok = json.loads(conn.recv_bytes())
                    results[idx] = bool(ok) and job_id == idx
                    self._release(w)
                except Exception:  # worker died mid-job (e.g. killed by the OS): wrong, replace
                    results[idx] = False
                    self._retire(w)
            now = time.monotonic()
            for conn in [c for c, (_, _, d) in inflight.items() if d <= now]:
                w, idx, _ = inflight.pop(conn)
                results[idx] = False
                self.kills += 1
                self._retire(w)

    def close(self) -> None:
        """Stop all workers. The pool cannot be used afterwards."""
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._cond.notify_all()
        for w in workers:
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool used by :func:`is_correct` (created on first use; recreated in a
    forked child, which must not share its parent's workers)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._pid != os.getpid() or _default_pool._closed:
            _default_pool = VerifierPool()
        return _default_pool


@atexit.register
def _close_default_pool() -> None:
    pool = _default_pool
    if pool is not None and pool._pid == os.getpid():
        pool.close()


_DOLLAR_RE = re.compile(r"(?<!\\)\$")  # math delimiters; an escaped \$ (currency) stays


def _gold_str(gold) -> str | None:
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (int,)):
        return str(gold)
    if isinstance(gold, float):
        return str(int(gold)) if gold.is_integer() else repr(gold)
    if isinstance(gold, str):
        return _DOLLAR_RE.sub("", gold).strip() or None
    if isinstance(gold, (list, tuple)) and gold and all(isinstance(g, str) for g in gold):
        return ", ".join(_DOLLAR_RE.sub("", g).strip() for g in gold) or None
    return None


def is_correct_batch(
    model_outputs: Sequence[str],
    gold_answers: Sequence,
    timeout: float = DEFAULT_TIMEOUT,
    last_number_fallback: bool = True,
    pool: VerifierPool | None = None,
    exact_match: bool = True,
) -> list[bool]:
    """Batched :func:`is_correct`: one bool per (output, gold) pair, checked in parallel.

    Never raises for bad samples (a non-string output, an answer that cannot be parsed, a
    pathological expression: each is ``False``). Raises ``ValueError`` only for mismatched
    lengths or a non-positive ``timeout``.
    """
    if len(model_outputs) != len(gold_answers):
        raise ValueError(
            f"model_outputs and gold_answers must have the same length, got {len(model_outputs)} and {len(gold_answers)}"
        )
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    results = [False] * len(model_outputs)
    jobs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, (out, gold) in enumerate(zip(model_outputs, gold_answers)):
        try:
            g = _gold_str(gold)
            pred = extract_answer(out, last_number_fallback=last_number_fallback) if isinstance(out, str) else None
        except Exception:  # extraction is plain string scanning; belt and braces
            g, pred = None, None
        if g is None or pred is None:
            continue
        jobs.append((pred, g))
        where.append(i)
    if not jobs:
        return results
    try:
        checked = (pool or default_pool()).check(jobs, timeout=timeout, exact_match=exact_match)
    except Exception:
        logger.exception("creditlib.eval: answer verification failed; answering False")
        return results
    for i, ok in zip(where, checked):
        results[i] = ok
    return results


def is_correct(model_output: str, gold_answer, timeout: float = DEFAULT_TIMEOUT, last_number_fallback: bool = True) -> bool:
    """Whether ``model_output`` (untrusted text) states an answer equivalent to ``gold_answer``.

    The answer is extracted from the text (last ``\\boxed{}``, GSM8K ``####``, "the answer is",
    then optionally the last number: see :func:`creditlib.eval.extract.extract_answer`) and
    compared with ``gold_answer`` (a LaTeX or plain answer string, a number, or a list of
    strings) by math-verify in a worker process. Returns within about ``timeout`` seconds from
    any thread and never raises on any ``model_output``: anything that cannot be checked in time
    is ``False`` (only a non-positive ``timeout`` is a ``ValueError``).
    """
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    try:
        return is_correct_batch([model_output], [gold_answer], timeout=timeout, last_number_fallback=last_number_fallback)[0]
    except Exception:
        return False
