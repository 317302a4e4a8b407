"""creditlib: composable credit-assignment primitives for RL fine-tuning of language models.

    import creditlib
    from creditlib import DecayStyle, TraceAdvantage, CriticFreeTD, ClampNegative
    from creditlib import functional as F

``pip install creditlib`` needs torch only: :class:`DecayStyle`, :mod:`creditlib.functional`,
:mod:`creditlib.losses` (``grpo_lambda_loss``), the credit-method registry and the kernels. The
other layers are extras, imported only when asked for; each names its extra when it is missing:

* ``creditlib[torchrl]``: the TensorDict modules (``TraceAdvantage``, ``CriticFreeTD``, ...) and
  ``creditlib.losses.GRPOLambdaLoss``;
* ``creditlib[rl]``: :mod:`creditlib.rl` (the recipes' components); ``creditlib[eval]``: :mod:`creditlib.eval`;
* ``creditlib[trl]`` / ``creditlib[verl]``: :mod:`creditlib.integrations`.

``python -m creditlib.build_kernels`` builds the C++ trace kernel ahead of time.
"""

from . import functional
from .style import DecayStyle

__version__ = "0.2.0"

# The TensorDict modules (extra [torchrl]) and the credit-method registry (torch only), loaded on
# first access so that `import creditlib` imports torch and nothing else.
_MODULES = ("TraceAdvantage", "CriticFreeTD", "ClampNegative", "PrefixGAE", "PrefixTD", "EntropySelect",
            "CreditAdvantage", "credit_pipeline")
_CREDIT = ("CreditMethod", "Advantage", "CreditBatch", "register_credit", "get_credit", "list_credits")
_SUBPACKAGES = ("losses", "eval", "integrations", "rl", "credit", "modules")

# Star-imports take the torch-only names (the TensorDict modules stay attributes, so that
# `from creditlib import *` works without the [torchrl] extra).
__all__ = ["DecayStyle", "functional", *_CREDIT, "__version__"]


def __getattr__(name):
    import importlib

    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.modules"), name)
    if name in _CREDIT:
        return getattr(importlib.import_module(f"{__name__}.credit"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'creditlib' has no attribute {name!r}")
