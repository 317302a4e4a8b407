"""pass@k (Chen et al. 2021) against brute-force enumeration; avg@k; benchmark aggregation."""

import itertools
import math

import pytest

from creditlib.eval.metrics import avg_at_k, benchmark_metrics, pass_at_k


def brute_force_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_special_cases_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    # large n: product form stays finite where binomials would be huge
    v = pass_at_k(1000, 1, 500)
    assert v == pytest.approx(0.5)


@pytest.mark.parametrize("args", [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4), (3.0, 1, 1), (3, 1, True)])
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_avg_at_k_and_benchmark_metrics():
    assert avg_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])
    per_problem = [[True, False, False, False], [False] * 4, [True] * 4]
    m = benchmark_metrics(per_problem)
    assert m["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["avg@4"] == pytest.approx(m["pass@1"])
    assert m["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx((brute_force_pass_at_k(4, 1, 2) + 0 + 1) / 3)
    assert m["n_problems"] == 3 and m["n_samples"] == 4
    with pytest.raises(ValueError):
        benchmark_metrics([[True], [True, False]])
    with pytest.raises(ValueError):
        benchmark_metrics([])
    with pytest.raises(ValueError):
        benchmark_metrics(per_problem, ks=[5])
