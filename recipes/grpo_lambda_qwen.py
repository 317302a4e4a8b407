#!/usr/bin/env python
"""Old name of ``recipes/grpo_lambda.py`` (GRPO-lambda; the recipe runs any causal LM, Qwen or LLaMA).

    python recipes/grpo_lambda_qwen.py ...   ==   python recipes/grpo.py --credit grpo-lambda ...

Kept so that existing commands keep working; new commands use ``recipes/grpo_lambda.py`` or
``recipes/grpo.py --credit NAME``.
"""

from __future__ import annotations

from pathlib import Path

from creditlib.rl.loop import load_recipe  # needs creditlib installed (make install / pip install -e .)

recipe = load_recipe(Path(__file__).resolve().with_name("grpo.py"))  # the pipeline, loaded from its file
NAME = "GRPO-lambda"
DEFAULTS = {"credit": "grpo-lambda"}


def main(argv=None, defaults=None, name: str = NAME, prog: str = "grpo_lambda_qwen.py", description=None) -> dict:
    return recipe.main(argv, defaults=dict(DEFAULTS, **(defaults or {})), name=name, prog=prog,
                       description=description or (__doc__ + "\n" + recipe.__doc__))


if __name__ == "__main__":
    main()
