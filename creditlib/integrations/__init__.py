"""creditlib.integrations: GRPO-lambda inside the trainers people already run.

* :mod:`creditlib.integrations.trl`: ``GRPOLambdaConfig`` / ``GRPOLambdaTrainer``, a subclass of
  TRL's ``GRPOTrainer`` (optional extra ``creditlib[trl]``; see ``docs/trl.md``).
* :mod:`creditlib.integrations.verl`: a ``grpo_lambda`` policy loss and a clamped GRPO advantage
  estimator for verl's registries (install creditlib with ``--no-deps`` into a verl environment; see ``docs/verl.md``).

Nothing here is imported by ``import creditlib``; each submodule imports its trainer only when it
is itself imported, and says which extra to install when the trainer is missing.
"""

import importlib

__all__ = ["trl", "verl"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
