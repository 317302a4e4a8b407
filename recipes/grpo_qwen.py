#!/usr/bin/env python
"""GRPO baseline under its old name: ``recipes/grpo.py`` (credit ``grpo``; runs any causal LM, Qwen or LLaMA).

    python recipes/grpo_qwen.py ...   ==   python recipes/grpo.py ...

The GRPO baseline is the same pipeline as GRPO-lambda with the credit method ``grpo``: no trace
(the per-token PPO ratio) and no clamp, through the same ``GRPOLambdaLoss`` code path. Kept so that
existing commands keep working; new commands use ``recipes/grpo.py``.
"""

from __future__ import annotations

from pathlib import Path

from creditlib.rl.loop import load_recipe  # needs creditlib installed (make install / pip install -e .)

recipe = load_recipe(Path(__file__).resolve().with_name("grpo.py"))  # the pipeline, loaded from its file
NAME = "GRPO"
DEFAULTS = {"credit": "grpo"}


def main(argv=None, defaults=None, name: str = NAME, prog: str = "grpo_qwen.py", description=None) -> dict:
    return recipe.main(argv, defaults=dict(DEFAULTS, **(defaults or {})), name=name, prog=prog,
                       description=description or (__doc__ + "\n" + recipe.__doc__))


if __name__ == "__main__":
    main()
