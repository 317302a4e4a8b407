#!/usr/bin/env python
"""GRPO baseline: the GRPO-lambda recipe with the trace off and no clamp.

    python recipes/grpo_qwen.py                   # embedded default, same task, model and budget
    python recipes/grpo_qwen.py --help            # every option (shared with grpo_lambda_qwen.py)

This runs exactly the pipeline of ``recipes/grpo_lambda_qwen.py`` (warm-up -> RL -> evaluation,
same rollout, reward, advantage, optimizer, checkpoints) with two defaults changed:

    lam = 0          the eligibility trace is the identity: z_t = x_t, the per-token PPO ratio
    clamp_min = none negative advantages are not clamped

so the loss is GRPO's clipped surrogate, through the same ``grpo_lambda_loss`` code path. Any other
difference between the two recipes' results is the trace and the clamp, nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling recipe
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo_lambda_qwen  # noqa: E402

NAME = "GRPO"
DEFAULTS = {"lam": 0.0, "clamp_min": None, "output_dir": "runs/grpo_qwen"}


def main(argv=None, defaults=None) -> dict:
    return grpo_lambda_qwen.main(argv, defaults=dict(DEFAULTS, **(defaults or {})), name=NAME,
                                 prog="grpo_qwen.py", description=__doc__)


if __name__ == "__main__":
    main()
