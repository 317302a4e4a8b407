#!/usr/bin/env python
"""Deprecated old name (removed in creditlib 0.4): use ``recipes/grpo.py --config recipes/configs/grpo.yaml``.

    python recipes/grpo_qwen.py ARGS   ==   python recipes/grpo.py --config recipes/configs/grpo.yaml ARGS

The GRPO baseline (credit ``grpo``); the recipe runs any causal LM, the ``_qwen`` name only
described the embedded model.
"""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "grpo.yaml"

if __name__ == "__main__":
    print(f"FutureWarning: recipes/grpo_qwen.py is deprecated and will be removed in creditlib 0.4: run recipes/grpo.py --config recipes/configs/grpo.yaml (the same run)",
          file=sys.stderr)
    sys.argv[1:1] = ["--config", str(CONFIG)]
    runpy.run_path(str(HERE / "grpo.py"), run_name="__main__")
