"""Optional dependencies: which extra each layer needs, and one clear error when it is missing.

``pip install creditlib`` installs torch (and ninja, for the C++ kernel build) only: the core
(:mod:`creditlib.style`, :mod:`creditlib.functional`, :mod:`creditlib.losses.functional`, the
kernels) needs nothing else. Every other layer belongs to an extra and calls :func:`require` when it
is imported, before importing its packages::

    from creditlib._extras import require
    require("torchrl", "creditlib.modules")   # ImportError: ... pip install 'creditlib[torchrl]'

:func:`require` only looks the packages up (``importlib.util.find_spec``): it imports nothing, so a
layer's own lazy imports stay lazy. The table below is the import-name side of the extras declared
in ``pyproject.toml`` (``tests/test_packaging.py`` holds the two against each other).
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List, Tuple

__all__ = ["EXTRAS", "install_hint", "missing", "require"]

#: extra -> the top-level modules it provides (what the layers import).
EXTRAS: Dict[str, Tuple[str, ...]] = {
    "torchrl": ("tensordict", "torchrl"),
    "eval": ("math_verify", "datasets", "numpy", "tqdm"),
    "rl": ("tensordict", "torchrl", "math_verify", "transformers", "datasets", "safetensors", "tqdm",
           "matplotlib", "yaml", "numpy"),
    "trl": ("trl", "accelerate"),
    "verl": ("verl",),
    "vllm": ("vllm",),
    "triton": ("triton",),
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'creditlib[extra]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return f"pip install 'creditlib[{extra}]'"


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module with __spec__ None
        return False


def missing(extra: str) -> List[str]:
    """The modules of ``extra`` that cannot be found, in the table's order (empty: all present)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return [m for m in EXTRAS[extra] if not _present(m)]


def require(extra: str, layer: str) -> None:
    """Raise ``ImportError`` naming ``extra`` if any of its modules is missing.

    Args:
        extra: a key of :data:`EXTRAS` (``"torchrl"``, ``"rl"``, ``"eval"``, ``"trl"``, ...).
        layer: what is being imported, for the message (``"creditlib.modules"``).

    Raises:
        ImportError: ``"creditlib.modules needs the optional dependencies of creditlib[torchrl]
            (missing: tensordict, torchrl): pip install 'creditlib[torchrl]'"``; its ``name`` is the
            first missing module.
    """
    gone = missing(extra)
    if gone:
        raise ImportError(
            f"{layer} needs the optional dependencies of creditlib[{extra}] (missing: {', '.join(gone)}): "
            f"{install_hint(extra)}", name=gone[0])
