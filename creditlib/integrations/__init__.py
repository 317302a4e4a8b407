"""creditlib.integrations: every credit method of :mod:`creditlib.credit` inside the trainers people already run.

* :mod:`creditlib.integrations.trl`: ``CreditConfig(credit=NAME)`` / ``CreditTrainer`` (any
  registered method: per-token prefix-tree advantages, traced / normalised / sequence log-ratios,
  entropy-selected tokens) and ``GRPOLambdaConfig`` / ``GRPOLambdaTrainer``, subclasses of TRL's
  ``GRPOTrainer`` (optional extra ``creditlib[trl]``; see ``docs/trl.md``).
* :mod:`creditlib.integrations.verl`: a ``grpo_lambda`` policy loss (every trace style), a clamped
  GRPO advantage estimator and a ``creditlib`` estimator that runs any registered method (prefix-tree
  GAE included) in verl's registries (optional extra ``creditlib[verl]``, which does not combine with
  ``[torchrl]``/``[rl]``: verl pins tensordict<=0.10; the module itself needs torch only; see ``docs/verl.md``).

Nothing here is imported by ``import creditlib``; each submodule imports its trainer only when it
is itself imported, and says which extra to install when the trainer is missing.
"""

import importlib

__all__ = ["trl", "verl"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
