#!/usr/bin/env python
"""GRPO-lambda (arXiv 2510.00194): ``recipes/grpo.py`` with ``--credit grpo-lambda``.

    python recipes/grpo_lambda.py                  # the embedded default (CPU, offline, a few minutes): make run
    python recipes/grpo_lambda.py --lam 0.95       # any option of recipes/grpo.py (--help)

The same pipeline as ``recipes/grpo.py`` (warm-up -> RL -> evaluation) with the credit method
``grpo-lambda``: the loss takes the eligibility trace of the token log-ratios (``recent``,
``lam = 0.99``) and the advantages pass the negative clamp ``max(A, -0.1)``. Output: a new
folder ``runs/grpo-lambda-<task>-<YYYYmmdd-HHMMSS>`` per run (``--output-dir`` to choose one).
"""

from __future__ import annotations

from pathlib import Path

from creditlib.rl.loop import load_recipe  # needs creditlib installed (make install / pip install -e .)

recipe = load_recipe(Path(__file__).resolve().with_name("grpo.py"))  # the pipeline, loaded from its file
NAME = "GRPO-lambda"
DEFAULTS = {"credit": "grpo-lambda"}


def main(argv=None, defaults=None, name: str = NAME, prog: str = "grpo_lambda.py", description=None) -> dict:
    return recipe.main(argv, defaults=dict(DEFAULTS, **(defaults or {})), name=name, prog=prog,
                       description=description or (__doc__ + "\n" + recipe.__doc__))


if __name__ == "__main__":
    main()
