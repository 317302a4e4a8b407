"""The issue-17 speed check: each turn-credit kind against ``F.prefix_td`` on one agent-shaped batch.

    nice -n 10 .venv/bin/python benchmarks/turns_vs_prefix.py [--rounds 30] [--B 64 --T 8192 --turns 16 --G 8]

``B = 64`` trajectories of ``T = 8192`` tokens, 16 turns per row (policy runs with an observation
gap of 1/8 to 1/3 of each turn's span after it, masked), groups of 8 sharing prefixes, one thread,
float32 rewards. Timed in interleaved rounds (medians and minima):

* ``clone``: ``x.clone()`` of a float32 ``[B, T]`` (the memory floor);
* ``prefix_td``: ``F.prefix_td(tokens, mask, rewards, G)`` (the yardstick; target: each turn
  function <= 2x it);
* ``turn-grpo``, ``turn-index``, ``anchor-state``, ``prefix-turn``: ``F.turn_credit(kind,
  turn_ids, turn_rewards, rewards, G, mask=mask, ...)`` per token ``[B, T]`` (``state_ids`` for
  anchor-state, ``tokens`` for prefix-turn), validation included;
* ``turn_ids_from_mask``: the default turn ids of the registry path.

Prints one line per function with its median in ms and the ratios to ``prefix_td`` and ``clone``,
then the CPU and the load average: run it on a quiet machine and report them beside the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from creditlib import functional as F
from creditlib.ops.turns import KINDS


def make_batch(B: int = 64, T: int = 8192, turns: int = 16, G: int = 8, seed: int = 0) -> dict:
    """An agent batch: ``turns`` policy runs per row, each followed by a masked observation; the
    rows of a group share prefixes (each copies a random earlier member up to a random cut).

    Returns a dict of ``tokens`` int64 ``[B, T]``, ``mask`` bool ``[B, T]``, ``turn_ids`` int64
    ``[B, T]``, ``rewards`` float32 ``[B]``, ``turn_rewards`` float32 ``[B, turns]``,
    ``state_ids`` int64 ``[B, turns]``, ``x`` float32 ``[B, T]`` and ``G``."""
    g = torch.Generator().manual_seed(seed)
    chunk = T // turns
    obs = torch.randint(max(chunk // 8, 1), max(chunk // 3, 2), (B, turns), generator=g)  # [B, turns]
    ar = torch.arange(T)  # [T]
    tk = (ar // chunk).clamp_max(turns - 1)  # [T] the turn span of each column
    mask = (ar % chunk)[None, :] < (chunk - obs[:, tk])  # [B, T] policy tokens, then the observation
    mask &= ar[None, :] < turns * chunk  # [B, T]
    tokens = torch.randint(0, 32000, (B, T), generator=g)  # [B, T]
    for k in range(B // G):
        for i in range(1, G):
            j = k * G + int(torch.randint(0, i, (1,), generator=g))
            cut = int(torch.randint(0, T, (1,), generator=g))
            tokens[k * G + i, :cut] = tokens[j, :cut]
    ids = F.turn_ids_from_mask(mask)  # [B, T]
    return {"tokens": tokens, "mask": mask, "turn_ids": ids,
            "rewards": torch.randint(0, 2, (B,), generator=g).float(),  # [B]
            "turn_rewards": 0.1 * torch.rand(B, turns, generator=g),  # [B, turns]
            "state_ids": torch.randint(0, 8, (B, turns), generator=g),  # [B, turns] few states: revisits
            "x": torch.randn(B, T, generator=g), "G": G}


def functions(d: dict) -> dict:
    """name -> zero-argument callable, for the batch ``d`` of :func:`make_batch`."""
    tok, mask, ids, r, tr, st, x, G = (d[k] for k in ("tokens", "mask", "turn_ids", "rewards", "turn_rewards",
                                                      "state_ids", "x", "G"))
    fns = {"clone": lambda: x.clone(),
           "prefix_td": lambda: F.prefix_td(tok, mask, r, G)}
    for kind in KINDS:
        kw = {"state_ids": st} if kind == "anchor-state" else {"tokens": tok} if kind == "prefix-turn" else {}
        fns[kind] = (lambda kind=kind, kw=kw: F.turn_credit(kind, ids, tr, r, G, mask=mask, **kw))
    fns["turn_ids_from_mask"] = lambda: F.turn_ids_from_mask(mask)
    return fns


def interleaved(fns: dict, rounds: int, warmup: int = 3) -> dict:
    """name -> list of wall times (s), the functions called in turn in every round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return ts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = make_batch(args.B, args.T, args.turns, args.G)
    ts = interleaved(functions(d), args.rounds)
    med = {k: statistics.median(v) for k, v in ts.items()}
    mn = {k: min(v) for k, v in ts.items()}
    n_valid = int(d["mask"].sum())
    print(f"B={args.B} T={args.T} turns/row={args.turns} G={args.G}, {n_valid / d['mask'].numel():.0%} policy "
          f"tokens, 1 thread, median of {args.rounds} interleaved rounds (min-to-min in brackets)")
    for k in med:
        print(f"  {k:20s} {med[k] * 1e3:8.2f} ms   {med[k] / med['prefix_td']:5.2f}x prefix_td "
              f"({mn[k] / mn['prefix_td']:.2f}x)   {med[k] / med['clone']:7.1f}x clone")
    worst = max(med[k] / med["prefix_td"] for k in KINDS)
    print(f"worst turn kind / prefix_td: {worst:.2f}x (target <= 2x)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"CPU: {cpu_name()}; load average {' '.join(f'{v:.2f}' for v in load)}; torch {torch.__version__}")
    return {"median_s": med, "min_s": mn}


if __name__ == "__main__":
    main()
