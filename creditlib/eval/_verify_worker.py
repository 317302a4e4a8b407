"""Verification worker: a child process that runs math-verify on (prediction, gold) pairs.

Started by :class:`creditlib.eval.verify.VerifierPool` as ``python _verify_worker.py FD`` (run by
path, so the child imports neither torch nor creditlib: only the standard library and
math-verify). It talks over the socket ``FD`` with length-prefixed JSON messages:

    parent -> worker   [job_id, prediction, gold, soft_timeout_s, exact_match]
    worker -> parent   [job_id, true|false]

The worker bounds its own work with a SIGALRM interval timer (``soft_timeout_s``, sub-second
resolution; it runs in this process's main thread, so signals work); work stuck inside C code
that a signal cannot interrupt is handled by the parent, which kills the worker at the hard
deadline. An address-space limit turns a runaway big-number computation into a MemoryError.
This file is also importable (``check_pair``, no time limit) for tests and investigations.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import signal
import sys

_SCI_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)\s*$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textnormal|mbox)\s*\{([^{}]*)\}")
_SPACE_CMDS_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_NUM_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORDS_RE = re.compile(r"[A-Za-z]{2,}[A-Za-z ]*")
_PLAIN_EXPR_RE = re.compile(r"[-+]?[\d\s.,+\-*/^()×÷%]+")
_BASE_RE = re.compile(r"(\w+)_\{?(\d+)\}?")
_SUBSCRIPT_VAR_RE = re.compile(r"(?<![\\\w])[A-Za-z]_(?:\{[^{}]*\}|\w)")


# math-verify warns once when its own (signal.alarm, whole-second) timeouts are disabled; this
# module replaces them with a sub-second interval timer plus the parent's hard kill.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)
logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)


class SoftTimeout(BaseException):
    """Raised by the interval timer; a BaseException so that library `except Exception` blocks
    inside sympy/math-verify cannot swallow it."""


def _on_alarm(signum, frame):  # pragma: no cover - exercised in the worker process
    raise SoftTimeout()


def _unwrap_text(s: str) -> str:
    for _ in range(3):
        s2 = _TEXT_RE.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    return s


def normalise(ans: str) -> str:
    """Rewrite forms math-verify misreads, without evaluating anything: ``4.5e33`` (read as
    4.5*E*33) becomes ``4.5\\times10^{33}``; a number wrapped in text commands or parentheses
    (``\\textbf{(073)}``, AoPS style, read as the symbol ``073``) becomes the bare number."""
    m = _SCI_RE.match(ans)
    if m:
        return f"{m.group(1)}\\times10^{{{m.group(2)}}}"
    inner = _unwrap_text(ans).strip()
    if inner != ans.strip() or inner.startswith("("):
        bare = inner.strip("() ")
        if _NUM_RE.fullmatch(bare):
            return bare
    return ans


def string_key(ans: str) -> str:
    """A canonical string for exact-match comparison of non-numeric answers (text answers such
    as "Yes" or "\\text{(C)}"): drops ``$``, ``\\text{}``-style wrappers, ``\\left``/``\\right``,
    LaTeX spacing, whitespace, a trailing full stop; lower-cases plain words only."""
    s = _unwrap_text(ans)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACE_CMDS_RE.sub("", s)
    s = s.replace("$", "")
    s = "".join(s.split()).rstrip(".")
    # letters are case-sensitive in mathematics (A vs a); plain words ("Yes", "No") are not
    return s.lower() if _WORDS_RE.fullmatch(s) else s


def _parse(ans: str):
    """math-verify's parse of one answer string. LaTeX first; the plain-expression extractor
    only for answers that are plain arithmetic (it otherwise picks any number out of LaTeX it
    could not parse, and two different unparsable answers would then compare equal)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic, MatrixBase

    s = normalise(ans)
    latex = parse("\\boxed{" + s + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if any(isinstance(x, (Basic, MatrixBase)) for x in latex):
        return latex
    if _PLAIN_EXPR_RE.fullmatch(s):
        expr = parse(s, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
        if any(isinstance(x, (Basic, MatrixBase)) for x in expr):
            return expr
    return latex  # only the raw string: compared as a string by math-verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _parse(gold)


def _parse_pred(pred: str):
    return _parse(pred)


def _as_real(parsed) -> float | None:
    from sympy import Basic

    for x in parsed:
        if isinstance(x, Basic):
            try:
                if x.is_number:
                    v = complex(x.evalf(30))
                    if v.imag == 0 and math.isfinite(v.real):
                        return v.real
            except Exception:
                return None
            return None
    return None


def _numbers_agree(gold_parsed, pred_parsed) -> bool:
    """math-verify compares floats after rounding to 6 decimals, so 2.88e-19 == 2.88e-20.
    For numbers below 1e-3 in magnitude require a relative agreement of 1e-4 instead (the
    tolerance of the Qwen2.5-Math evaluation)."""
    a, b = _as_real(gold_parsed), _as_real(pred_parsed)
    if a is None or b is None:
        return True
    if max(abs(a), abs(b)) >= 1e-3:
        return True
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=0.0)


def _suspect(ans: str, parsed) -> bool:
    """A parse that lost the answer's subscripted variables (latex2sympy reads
    ``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}`` as ``2/3``): such a parse would make different
    answers compare equal, so only an exact string match may decide."""
    from sympy import Basic

    if not _SUBSCRIPT_VAR_RE.search(ans):
        return False
    for x in parsed:
        if isinstance(x, Basic):
            try:
                return not x.free_symbols
            except Exception:
                return True
    return False


def _bases_agree(gold: str, pred: str) -> bool:
    """``52_8`` and ``52_9`` name different numbers, but math-verify drops the subscript."""
    g, p = _BASE_RE.fullmatch(gold.strip()), _BASE_RE.fullmatch(pred.strip())
    return not (g and p) or g.group(2) == p.group(2)


def check_pair(pred: str, gold: str, exact_match: bool = True) -> bool:
    """True if the extracted answer ``pred`` equals the gold answer ``gold`` (both LaTeX/plain
    answer strings, not whole solutions). Exact canonical-string match first (text answers;
    skipped with ``exact_match=False``), then math-verify's parse + verify. No time limit here:
    callers bound the time."""
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if exact_match:
        key = string_key(gold)
        if key and key == string_key(pred):
            return True
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = _parse_pred(pred)
    if not pred_parsed:
        return False
    if _suspect(gold, gold_parsed) or _suspect(pred, pred_parsed):
        return string_key(gold) == string_key(pred)
    if not verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return False
    return _numbers_agree(gold_parsed, pred_parsed) and _bases_agree(gold, pred)


def _limit_memory(max_mb: int) -> None:
    if max_mb <= 0:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = max_mb * 1024 * 1024
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except Exception:  # platforms without RLIMIT_AS: the parent's hard kill still bounds time
        pass


def main(argv: list[str]) -> int:  # pragma: no cover - runs in the child process
    from multiprocessing.connection import Connection

    fd = int(argv[1])
    max_mb = int(argv[2]) if len(argv) > 2 else 0
    conn = Connection(fd)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which cleans up
    try:
        check_pair("1", "1")  # warm up: imports sympy, loads the LaTeX grammar
        check_pair("\\frac{1}{2}", "0.5")
    except BaseException:
        pass
    _limit_memory(max_mb)
    conn.send_bytes(b'"ready"')
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return 0
        job_id, pred, gold, soft, exact = json.loads(msg)
        ok = False
        try:
            signal.setitimer(signal.ITIMER_REAL, max(float(soft), 0.001))
            try:
                ok = check_pair(pred, gold, bool(exact))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:  # SoftTimeout, MemoryError, RecursionError, anything: "wrong"
            ok = False
        try:
            conn.send_bytes(json.dumps([job_id, bool(ok)]).encode())
        except (EOFError, OSError):
            return 0


if __name__ == "__main__":  # pragma: no cover
    # Run by path: drop this file's folder from sys.path so that sibling modules (data.py,
    # verify.py, ...) cannot shadow third-party modules of the same name.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.exit(main(sys.argv))
