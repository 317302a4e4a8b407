"""Fused CPU kernel of the trace scan: a C++ torch extension, JIT-built at first use and cached.

The source is ``csrc/trace_cpu.cpp``. Like DeepSpeed's op builder, it is compiled with
:func:`torch.utils.cpp_extension.load` the first time it is needed, into a cache directory keyed by
a hash of the source, the torch and Python versions, the compiler flags, the compiler and the CPU
(``-march=native`` binaries are CPU-specific). Later processes load the cached shared library
directly (no compiler, no ninja run). Concurrent builds are serialised by a lock in this process and
by torch's file baton across processes.

Environment:
    ``CREDITLIB_CACHE_DIR``: cache root (default ``~/.cache/creditlib``);
    ``CREDITLIB_NO_BUILD=1``: never compile (``can_build()`` is False; a cached build still loads);
    ``CXX``: the C++ compiler (default ``c++``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Optional

import torch

_SRC = Path(__file__).resolve().parent / "csrc" / "trace_cpu.cpp"
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-DNDEBUG"]  # no -ffast-math: NaN semantics matter
_LOCK = threading.Lock()
_module = None
_can_build: Optional[bool] = None
_key: Optional[str] = None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_version() -> str:
    exe = shutil.which(_compiler())
    if exe is None:
        return "none"
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on a different CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_root() -> Path:
    root = os.environ.get("CREDITLIB_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "creditlib"


def build_key() -> str:
    """Hash of everything the binary depends on."""
    global _key
    if _key is None:
        h = hashlib.sha256()
        for part in (_SRC.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                     sysconfig.get_platform().encode(), " ".join(_CFLAGS).encode(),
                     _compiler_version().encode(), _cpu_id().encode()):
            h.update(part)
            h.update(b"\0")
        _key = h.hexdigest()[:16]
    return _key


def _name() -> str:
    return f"creditlib_trace_cpu_{build_key()}"


def build_dir() -> Path:
    return cache_root() / "trace_cpu" / build_key()


def _library_path() -> Path:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[-1] if os.name == "nt" else ".so"
    return build_dir() / f"{_name()}{suffix}"


def _import_library(path: Path):
    spec = importlib.util.spec_from_file_location(_name(), str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ready() -> bool:
    """True when the extension is loaded, or a cached build exists and loads (never compiles)."""
    global _module
    if _module is not None:
        return True
    path = _library_path()
    if not path.is_file():
        return False
    with _LOCK:
        if _module is None:
            try:
                _module = _import_library(path)
            except (ImportError, OSError):
                return False
    return True


def can_build() -> bool:
    """True when a C++ compiler, ninja and the torch headers are usable and CREDITLIB_NO_BUILD is unset."""
    global _can_build
    if os.environ.get("CREDITLIB_NO_BUILD", "") not in ("", "0"):
        return False
    if _can_build is None:
        ok = shutil.which(_compiler()) is not None
        try:
            from torch.utils import cpp_extension
            ok = ok and cpp_extension.is_ninja_available()
            ok = ok and any((Path(p) / "torch" / "extension.h").is_file() for p in cpp_extension.include_paths())
        except Exception:  # noqa: BLE001 - any failure here means "cannot build"
            ok = False
        _can_build = bool(ok)
    return _can_build


def load(verbose: bool = False):
    """The extension module: the loaded one, the cached build, or a fresh build (tens of seconds)."""
    global _module
    if ready():
        return _module
    if not can_build():
        raise RuntimeError(
            "creditlib's C++ trace kernel is not built and cannot be built here (no C++ compiler, ninja "
            "or torch headers, or CREDITLIB_NO_BUILD is set); use backend=\"torch\" instead.")
    with _LOCK:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension
        bdir = build_dir()
        bdir.mkdir(parents=True, exist_ok=True)
        try:
            _module = cpp_extension.load(
                name=_name(), sources=[str(_SRC)], extra_cflags=list(_CFLAGS), build_directory=str(bdir),
                verbose=verbose)
        except Exception as e:  # noqa: BLE001 - re-raised with a way out
            raise RuntimeError(
                f"building creditlib's C++ trace kernel failed ({type(e).__name__}: {e}); "
                f"build log and sources in {bdir}. Use backend=\"torch\" (pure PyTorch, no compiler) "
                f"to avoid the build.") from e
    return _module


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               d: float, eps: float, both: bool, transpose: bool) -> torch.Tensor:
    """``z = W x`` (``transpose=False``) or ``W^T x`` with the fused kernel (see ``creditlib._kernels``).

    Builds the extension on first use if no cached build exists.
    """
    from ..style import DecayStyle

    mod = load()
    L = DecayStyle("both" if both else "recent", gamma=1.0, lam=float(d), eps=float(eps)).window
    L = -1 if L is None else min(int(L), 1 << 62)
    return mod.trace_scan(x, mask_u8, cu_seqlens, float(d), float(eps), L, bool(both), bool(transpose))
