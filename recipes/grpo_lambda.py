#!/usr/bin/env python
"""GRPO-lambda (arXiv 2510.00194) on the embedded task: ``make run``.

    python recipes/grpo_lambda.py ARGS   ==   python recipes/grpo.py --config recipes/configs/grpo_lambda.yaml ARGS

The preset is its config, ``recipes/configs/grpo_lambda.yaml`` (credit ``grpo-lambda``: the
``recent`` trace with ``lam = 0.99`` inside the loss and the clamp ``max(A, -0.1)``; every other
value the recipe's default); this file only runs ``recipes/grpo.py`` with it. Flags override the
config; a ``--config`` of yours replaces it. Output: a new folder
``runs/grpo-lambda-<task>-<YYYYmmdd-HHMMSS>`` per run.
"""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "grpo_lambda.yaml"

if __name__ == "__main__":
    sys.argv[1:1] = ["--config", str(CONFIG)]
    runpy.run_path(str(HERE / "grpo.py"), run_name="__main__")
