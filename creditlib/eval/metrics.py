"""Sample-based metrics: pass@1, avg@k and the unbiased pass@k estimator.

With ``n`` samples per problem of which ``c`` are correct, the unbiased estimator of the
probability that at least one of ``k`` samples is correct (Chen et al., 2021, "Evaluating Large
Language Models Trained on Code", eq. 1) is

    pass@k = 1 - C(n - c, k) / C(n, k),

computed here as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which avoids huge binomials.
``pass@1`` is its ``k = 1`` case, ``c / n``; ``avg@k`` is the mean correctness of the ``k``
samples drawn per problem (``avg@k`` with ``n = k`` equals the unbiased pass@1). Benchmark
scores average the per-problem values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["pass_at_k", "avg_at_k", "benchmark_metrics"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean correctness of the samples of one problem (``k = len(correct)``)."""
    if len(correct) == 0:
        raise ValueError("correct must hold at least one sample")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def benchmark_metrics(per_problem: Sequence[Sequence[bool]], ks: Sequence[int] | None = None) -> dict[str, float]:
    """Metrics of one benchmark from per-problem sample correctness.

    Args:
        per_problem: one list of booleans per problem (its samples); all the same length ``n``.
        ks: the ``k`` for pass@k (default: powers of two up to ``n``, and ``n``).

    Returns:
        ``{"pass@1": ..., "avg@n": ..., "pass@k": ... for k in ks, "n_problems": P,
        "n_samples": n}`` with scores in [0, 1] averaged over problems.
    """
    if len(per_problem) == 0:
        raise ValueError("per_problem must hold at least one problem")
    ns = {len(s) for s in per_problem}
    if len(ns) != 1 or 0 in ns:
        raise ValueError(f"every problem must have the same number (>= 1) of samples, got counts {sorted(ns)}")
    n = ns.pop()
    if ks is None:
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k <= n} | {n})
    cs = [int(sum(bool(x) for x in s)) for s in per_problem]
    out: dict[str, float] = {"pass@1": float(np.mean([pass_at_k(n, c, 1) for c in cs]))}
    out[f"avg@{n}"] = float(np.mean([avg_at_k(s) for s in per_problem]))
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"ks must lie in [1, n={n}], got {k}")
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in cs]))
    out["n_problems"] = len(per_problem)
    out["n_samples"] = n
    return out
