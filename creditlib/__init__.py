"""creditlib: composable credit-assignment primitives for RL fine-tuning of language models.

    import creditlib
    from creditlib import DecayStyle, TraceAdvantage, CriticFreeTD, ClampNegative
    from creditlib import functional as F
"""

from . import functional
from .style import DecayStyle

__version__ = "0.1.0"

__all__ = ["DecayStyle", "functional", "TraceAdvantage", "CriticFreeTD", "ClampNegative", "__version__"]


def __getattr__(name):  # modules import tensordict lazily: `import creditlib` stays light
    if name in ("TraceAdvantage", "CriticFreeTD", "ClampNegative"):
        from . import modules
        return getattr(modules, name)
    if name in ("losses", "eval", "integrations", "rl"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'creditlib' has no attribute {name!r}")
