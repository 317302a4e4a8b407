"""Benchmarks of the turn credit (issue 17, "Speed"): pytest-benchmark.

One group ``turns B=<B> T=<T>``, every function timed in the same process so the ratios are read
within one run. Shapes: small by default (``B = 16``, ``T = 1024``, 8 turns per row, ``G = 8``),
so that the file also runs untimed under ``--benchmark-disable`` in seconds; the issue's shape
(``B = 64``, ``T = 8192``, 16 turns per row, ``G = 8``) with ``CREDITLIB_BENCH_TURNS_FULL=1``.
The batch is :func:`turns_vs_prefix.make_batch` (policy runs with masked observation gaps, groups
sharing prefixes); one thread (``conftest.py``).

* ``clone``: ``x.clone()`` of a float32 ``[B, T]`` (the memory floor);
* ``prefix_td``: ``F.prefix_td(tokens, mask, rewards, G)`` (the yardstick: target, each turn
  function <= 2x it);
* ``turn_credit:<kind>``: ``F.turn_credit(kind, turn_ids, turn_rewards, rewards, G, mask=mask)``
  for each kind, validation included;
* ``turn_ids_from_mask``;
* ``ratio:turns``: every kind and ``prefix_td`` timed interleaved; the ratios of the medians go to
  ``extra_info`` (never asserted).

    CREDITLIB_BENCH_TURNS_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_turns.py -q
    .venv/bin/python benchmarks/turns_vs_prefix.py      # the same comparison as a script, printed
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from turns_vs_prefix import functions, interleaved, make_batch

from creditlib.ops.turns import KINDS

FULL = os.environ.get("CREDITLIB_BENCH_TURNS_FULL", "") not in ("", "0", "false", "no")
B, T, TURNS, G = (64, 8192, 16, 8) if FULL else (16, 1024, 8, 8)

_DATA: dict = {}


def _data() -> dict:
    if not _DATA:
        _DATA.update(make_batch(B, T, TURNS, G))
    return _DATA


def _run(benchmark, fn, variant):
    benchmark.group = f"turns B={B} T={T}"
    benchmark.extra_info["variant"] = variant
    if not getattr(benchmark, "disabled", False):
        fn()  # warm-up
    return benchmark(fn)


def test_clone(benchmark):
    d = _data()
    out = _run(benchmark, functions(d)["clone"], "clone")
    assert out.shape == d["x"].shape


def test_prefix_td(benchmark):
    from creditlib import functional as F

    d = _data()
    out = _run(benchmark, functions(d)["prefix_td"], "prefix_td")
    torch.testing.assert_close(out.sum(1), F.group_advantage(d["rewards"], G, baseline="loo"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_turn_credit(benchmark, kind):
    from creditlib import functional as F

    d = _data()
    out = _run(benchmark, functions(d)[kind], f"turn_credit:{kind}")
    mask = d["mask"]
    assert out.shape == mask.shape and bool((out[~mask] == 0).all()) and bool(torch.isfinite(out).all())
    if kind == "turn-grpo":  # every token carries the RLOO advantage of the row's total reward
        total = d["rewards"] + d["turn_rewards"].sum(-1)
        want = F.group_advantage(total, G, baseline="loo")[:, None] * mask
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_turn_ids_from_mask(benchmark):
    d = _data()
    out = _run(benchmark, functions(d)["turn_ids_from_mask"], "turn_ids_from_mask")
    assert torch.equal(out, d["turn_ids"]) and int(out.amax()) == TURNS - 1


def test_interleaved_ratio(benchmark):
    """Each turn kind / prefix_td (and / clone), medians of interleaved rounds, in ``extra_info``;
    the benchmarked callable is one prefix_td + prefix-turn pair."""
    d = _data()
    fns = functions(d)
    rounds = 3 if getattr(benchmark, "disabled", False) else 15
    ts = interleaved(fns, rounds, warmup=1)
    med = {k: statistics.median(v) for k, v in ts.items()}
    for k in (*KINDS, "turn_ids_from_mask"):
        benchmark.extra_info[f"{k}/prefix_td"] = med[k] / med["prefix_td"]
        benchmark.extra_info[f"{k}/clone"] = med[k] / med["clone"]
    out = _run(benchmark, lambda: (fns["prefix_td"](), fns["prefix-turn"]())[1], "ratio:turns")
    assert out.shape == d["mask"].shape and bool(torch.isfinite(out).all())
