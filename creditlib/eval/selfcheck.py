"""Self-consistency of the checker on real benchmark files.

For every row, the publisher's own text that states the answer is run through extraction and
verification against the row's gold answer, and must be judged correct:

* ``solution``: the worked solution where it marks its final answer (GSM8K ``####``,
  ``\\boxed{}`` in MATH-500 / Minerva / AIME24), exactly as a model output would be checked;
* ``answer``: the gold answer string itself, written as a model would (``\\boxed{answer}``),
  for every benchmark (the only check possible for AMC23 and OlympiadBench).

Because an identical string is accepted before math-verify is asked, both are also run with
math-verify alone (``*_mv`` counts: the parser and the equivalence check must recognise the
answer by themselves). Finally every gold answer with a number in it is *perturbed* (its last
number plus one: ``\\frac{1}{2}`` -> ``\\frac{1}{3}``) and must be judged wrong against the
original.

Anything below 100% is either a checker weakness or a data quirk; the failures are returned so
they can be read. ``python recipes/eval_math.py --self-check DIR`` prints the table.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from .data import BENCHMARKS, load_benchmark, reference_solution
from .verify import DEFAULT_TIMEOUT, is_correct_batch

__all__ = ["SelfCheckResult", "self_check", "format_self_check", "perturb"]


@dataclass
class SelfCheckResult:
    """Counts and failures of one benchmark file."""

    benchmark: str
    file: str
    rows: int
    solution_checked: int = 0
    solution_correct: int = 0
    answer_checked: int = 0
    answer_correct: int = 0
    solution_correct_mv: int = 0
    answer_correct_mv: int = 0
    perturbed_checked: int = 0
    perturbed_rejected: int = 0
    seconds_mv: float = 0.0  # the math-verify-alone pass (solutions and answers)
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def solution_rate(self) -> float | None:
        return self.solution_correct / self.solution_checked if self.solution_checked else None

    @property
    def answer_rate(self) -> float | None:
        return self.answer_correct / self.answer_checked if self.answer_checked else None


_LAST_INT_RE = re.compile(r"\d+(?!.*\d)", re.DOTALL)


def perturb(answer: str) -> str | None:
    """``answer`` with its last integer increased by one (no evaluation), or None without one."""
    m = _LAST_INT_RE.search(answer)
    if m is None:
        return None
    return answer[: m.start()] + str(int(m.group(0)) + 1) + answer[m.end():]


def _files(data_dir: str, name: str) -> list[str]:
    folder = os.path.join(data_dir, name)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".jsonl", ".parquet")))


_CHUNK = 64  # checks per call when a progress bar is shown (the workers still run them in parallel)


class _Checker:
    """``is_correct_batch`` that advances a progress bar (``bar=None``: one call, no bar)."""

    def __init__(self, bar, **kw):
        self.bar, self.kw = bar, kw

    def __call__(self, preds: list, golds: list, **extra) -> list[bool]:
        if self.bar is None:
            return is_correct_batch(preds, golds, **self.kw, **extra)
        out: list[bool] = []
        for i in range(0, len(preds), _CHUNK):
            out += is_correct_batch(preds[i:i + _CHUNK], golds[i:i + _CHUNK], **self.kw, **extra)
            self.bar.update(len(preds[i:i + _CHUNK]))
        return out


def self_check(
    data_dir: str,
    benchmarks: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    last_number_fallback: bool = False,
    progress: bool = False,
) -> list[SelfCheckResult]:
    """Judge every gold solution / gold answer of the files under ``data_dir`` (laid out as
    ``<dir>/<benchmark>/*.jsonl``) against its gold answer. Returns one result per file, with
    wall times (``seconds``: loading plus the full checker on solutions and answers;
    ``seconds_mv``: the math-verify-alone pass) and the failing rows.

    ``progress=True`` shows a tqdm bar over every check (the first ones wait for the verification
    workers to import math-verify, several seconds)."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} is not a folder")
    names = benchmarks or list(BENCHMARKS)
    for n in names:
        if n not in BENCHMARKS:
            raise ValueError(f"benchmarks must be among {sorted(BENCHMARKS)}, got {n!r}")
    results = []
    loaded = []
    for name in names:
        for file in _files(data_dir, name):
            t0 = time.perf_counter()
            loaded.append((name, file, load_benchmark(name, path=file).to_list(), time.perf_counter() - t0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = 0
        for name, _, rows, _ in loaded:
            n_sol = sum(reference_solution(name, r) is not None for r in rows)
            n_pert = sum(perturb(r["answer"]) is not None for r in rows)
            total += 2 * (n_sol + len(rows)) + n_pert
        bar = tqdm(total=total, desc=f"self-check ({len(loaded)} files)", unit="check", dynamic_ncols=True)
    check = _Checker(bar, timeout=timeout, last_number_fallback=last_number_fallback)
    try:
        for name, file, rows, t_load in loaded:
            results.append(_check_file(name, file, rows, t_load, check, bar))
    finally:
        if bar is not None:
            bar.close()
    return results


def _check_file(name: str, file: str, rows: list, t_load: float, check: _Checker, bar) -> SelfCheckResult:
    """The checks of one benchmark file (see :func:`self_check`)."""
    t0 = time.perf_counter() - t_load
    if bar is not None:
        bar.set_postfix_str(f"{name}: {os.path.basename(file)}")
    res = SelfCheckResult(name, file, len(rows))
    sol_idx, sols = [], []
    for i, r in enumerate(rows):
        s = reference_solution(name, r)
        if s is not None:
            sol_idx.append(i)
            sols.append(s)
    golds = [r["answer"] for r in rows]
    ok_sol = check(sols, [golds[i] for i in sol_idx])
    ok_ans = check([f"\\boxed{{{g}}}" for g in golds], golds)
    res.seconds = time.perf_counter() - t0
    res.solution_checked, res.solution_correct = len(sols), sum(ok_sol)
    res.answer_checked, res.answer_correct = len(golds), sum(ok_ans)
    t1 = time.perf_counter()
    mv_sol = check(sols, [golds[i] for i in sol_idx], exact_match=False)
    mv_ans = check([f"\\boxed{{{g}}}" for g in golds], golds, exact_match=False)
    res.seconds_mv = time.perf_counter() - t1
    res.solution_correct_mv, res.answer_correct_mv = sum(mv_sol), sum(mv_ans)
    pert = [(i, perturb(g)) for i, g in enumerate(golds)]
    pert = [(i, p) for i, p in pert if p is not None]
    ok_pert = check([f"\\boxed{{{p}}}" for _, p in pert], [golds[i] for i, _ in pert])
    res.perturbed_checked, res.perturbed_rejected = len(pert), len(pert) - sum(ok_pert)
    for (i, p), ok in zip(pert, ok_pert):
        if ok:
            res.failures.append({"row": i, "kind": "perturbed_accepted", "answer": golds[i], "perturbed": p})
    for i, ok in zip(sol_idx, mv_sol):
        if not ok:
            res.failures.append({"row": i, "kind": "solution_mv", "answer": golds[i]})
    for i, ok in enumerate(mv_ans):
        if not ok:
            res.failures.append({"row": i, "kind": "answer_mv", "answer": golds[i]})
    for i, ok in zip(sol_idx, ok_sol):
        if not ok:
            res.failures.append({"row": i, "kind": "solution", "answer": golds[i], "text_tail": sols[sol_idx.index(i)][-300:]})
    for i, ok in enumerate(ok_ans):
        if not ok:
            res.failures.append({"row": i, "kind": "answer", "answer": golds[i]})
    return res


def format_self_check(results: list[SelfCheckResult]) -> str:
    """A markdown table of :func:`self_check` results."""

    def pct(c, n):
        return f"{100 * c / n:.2f}% ({c}/{n})" if n else "n/a"

    lines = [
        "| benchmark | file | rows | gold solution correct | gold answer correct | wall s "
        "| solution, math-verify alone | answer, math-verify alone | wall s (alone) | perturbed answer rejected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.benchmark} | {os.path.basename(r.file)} | {r.rows} | {pct(r.solution_correct, r.solution_checked)} "
            f"| {pct(r.answer_correct, r.answer_checked)} | {r.seconds:.1f} "
            f"| {pct(r.solution_correct_mv, r.solution_checked)} | {pct(r.answer_correct_mv, r.answer_checked)} "
            f"| {r.seconds_mv:.1f} | {pct(r.perturbed_rejected, r.perturbed_checked)} |"
        )
    return "\n".join(lines)
