"""A simple real-text arithmetic set, generated in code ("What is 17 + 25?").

The rows are in GSM8K's format (``question``, and ``answer`` ending in ``#### <number>``), so every
GSM8K path reads them: ``recipes/eval_math.py --data gsm8k=FILE``, ``recipes/grpo.py --dataset FILE``
and :func:`creditlib.eval.load_benchmark` ``("gsm8k", path=FILE)``::

    python -m creditlib.eval.arithmetic --n 100 --seed 0 --out arithmetic.jsonl

It is a floor for small chat models: one operation on two numbers below 100, stated in one
English sentence. Problems are a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import List

__all__ = ["arithmetic_rows", "write_arithmetic"]

_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}


def arithmetic_rows(n: int = 100, seed: int = 0, *, ops: str = "+-*", max_operand: int = 99) -> List[dict]:
    """``n`` GSM8K-format rows ``{"question": "What is 17 + 25?", "answer": "17 + 25 = 42\\n#### 42"}``.

    Args:
        n: number of problems (>= 1).
        seed: the problems are a function of ``(seed, index)``.
        ops: the operations to draw from, among ``+``, ``-``, ``*`` (products use a second operand < 13).
        max_operand: operands are drawn from ``[2, max_operand]`` (>= 2); subtraction never goes negative.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(ops, str) or not ops or any(o not in _OPS for o in ops):
        raise ValueError(f"ops must be a non-empty string of {''.join(_OPS)}, got {ops!r}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 2:
        raise ValueError(f"max_operand must be an int >= 2, got {max_operand!r}")
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        op = rng.choice(ops)
        a = rng.randint(2, max_operand)
        b = rng.randint(2, min(12, max_operand) if op == "*" else max_operand)
        if op == "-" and b > a:
            a, b = b, a
        c = _OPS[op][1](a, b)
        sym = "×" if op == "*" else op
        rows.append({"question": f"What is {a} {sym} {b}?", "answer": f"{a} {sym} {b} = {c}\n#### {c}"})
    return rows


def write_arithmetic(path: str, n: int = 100, seed: int = 0, **kw) -> str:
    """Write :func:`arithmetic_rows` to ``path`` as JSON lines; returns ``path``."""
    rows = arithmetic_rows(n, seed, **kw)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m creditlib.eval.arithmetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="number of problems")
    p.add_argument("--seed", type=int, default=0, help="problems are a function of (seed, index)")
    p.add_argument("--ops", default="+-*", help="operations to draw from")
    p.add_argument("--max-operand", type=int, default=99, help="largest operand")
    p.add_argument("--out", required=True, help="output .jsonl file (GSM8K format)")
    a = p.parse_args(argv)
    try:
        print(write_arithmetic(a.out, a.n, a.seed, ops=a.ops, max_operand=a.max_operand))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
