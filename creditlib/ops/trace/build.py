"""Build system of the fused CPU trace kernel: JIT-built at first use, cached, loaded.

The source is ``csrc/trace_cpu.cpp``; the wrapper that calls it is :mod:`creditlib.ops.trace.cpu`.
Like DeepSpeed's op builder, it is compiled with
:func:`torch.utils.cpp_extension.load` the first time it is needed, into a cache directory keyed by
a hash of the source, the torch and Python versions, the compiler flags, the compiler and the CPU
(``-march=native`` binaries are CPU-specific). Later processes load the cached shared library
directly (no compiler, no ninja run). ``python -m creditlib.build_kernels`` builds it ahead of time.

Build reliability:

* **One build at a time, and none left hanging.** Builds into one directory are serialised by an
  OS file lock on ``<build dir>/creditlib-build.lock`` (``fcntl.flock``; ``msvcrt.locking`` on
  Windows) that the operating system releases when its holder dies, Ctrl-C or SIGKILL alike; the
  holder writes its PID there, and a process that has to wait says for whom. Holding it, a build
  removes what an interrupted build leaves behind: torch's own lock file ``lock`` (which would make
  every later build wait forever) and an unfinished library.
* **A build is complete only when** ``BUILD_OK`` is written beside the library, after it loaded;
  only then do later processes load the library.
* **The first build announces itself** (a warning on the ``"creditlib"`` logger, which Python
  prints to stderr when logging is not configured): it takes about a minute, silently otherwise.
* **A failed build** is written to ``<build dir>/build.log`` and remembered for the process:
  ``load()`` raises a ``RuntimeError`` naming the log and ``backend="torch"`` (what an explicit
  ``backend="cpp"`` gets), and ``backend="auto"`` falls back to the PyTorch path with one warning
  (:func:`creditlib.ops.trace.choose_backend`).
* **ninja** comes with ``pip install creditlib``; it is found in the interpreter's scripts folder
  (a virtual environment used without activating it) or the ``ninja`` package when it is not on
  ``PATH``.

Environment (read once per process, at the first build or load):
    ``CREDITLIB_CACHE_DIR``: cache root (default ``~/.cache/creditlib``);
    ``CREDITLIB_NO_BUILD=1``: never compile (``can_build()`` is False; a cached build still loads);
    ``CREDITLIB_CPU_ISA``: ``native`` (default: ``-march=native``; the AVX-512 paths where the CPU
    has AVX-512 F, BW and VL), ``scalar`` (AVX-512 disabled: the portable path that CPUs without
    AVX-512 run; CI builds and tests it), or a ``-march`` value such as ``skylake-avx512`` or
    ``x86-64-v3`` (a build for another CPU; only run it where that CPU's instructions exist). Each
    value has its own cache key.
    ``CXX``: the C++ compiler (default ``c++``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch

_SRC = Path(__file__).resolve().parent / "csrc" / "trace_cpu.cpp"
_BASE_CFLAGS = ["-O3", "-fno-math-errno", "-DNDEBUG"]  # no -ffast-math: NaN semantics matter
_BUILD_FORMAT = "2"  # the cache layout (BUILD_OK marker, creditlib-build.lock): part of the key
_LOCK = threading.Lock()
_module = None
_can_build: Optional[bool] = None
_key: Optional[str] = None
_build_error: Optional[str] = None

logger = logging.getLogger("creditlib")

ISA_ENV = "CREDITLIB_CPU_ISA"
LOCK_NAME = "creditlib-build.lock"
MARKER_NAME = "BUILD_OK"
LOG_NAME = "build.log"


def isa() -> str:
    """The instruction-set choice of the build: ``CREDITLIB_CPU_ISA`` (default ``"native"``)."""
    v = os.environ.get(ISA_ENV, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", v):
        raise ValueError(f"{ISA_ENV} must be 'native', 'scalar' or a -march value such as 'skylake-avx512', "
                         f"got {v!r}")
    return v


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686")


def cflags() -> List[str]:
    """The compiler flags of the build for :func:`isa`."""
    v = isa()
    if v == "native":
        return [*_BASE_CFLAGS, "-march=native"]
    if v == "scalar":  # what a CPU without AVX-512 compiles: no AVX-512 code path, no AVX-512 autovectorisation
        flags = [*_BASE_CFLAGS, "-march=native", "-DCREDITLIB_NO_AVX512"]
        return flags + ["-mno-avx512f"] if _is_x86() else flags
    return [*_BASE_CFLAGS, f"-march={v}"]


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
        for part in (_BUILD_FORMAT.encode(), _SRC.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                     sysconfig.get_platform().encode(), " ".join(cflags()).encode(),
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


def _marker_path() -> Path:
    return build_dir() / MARKER_NAME


def _import_library(path: Path):
    spec = importlib.util.spec_from_file_location(_name(), str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_cached():
    """The cached build if it is complete and loads, else None (never compiles; caller holds _LOCK)."""
    path = _library_path()
    if not (path.is_file() and _marker_path().is_file()):
        return None
    try:
        return _import_library(path)
    except (ImportError, OSError):
        return None


def ready() -> bool:
    """True when the extension is loaded, or a complete cached build exists and loads (never compiles)."""
    global _module
    if _module is not None:
        return True
    if not (_library_path().is_file() and _marker_path().is_file()):
        return False
    with _LOCK:
        if _module is None:
            _module = _load_cached()
    return _module is not None


def build_error() -> Optional[str]:
    """The message of this process's failed build, or None (a failed build is not retried)."""
    return _build_error


def _ninja_dirs() -> List[str]:
    """Folders beyond ``PATH`` that may hold ``ninja``: the interpreter's scripts folder (a virtual
    environment's ``bin`` when it is used without activating it) and the ``ninja`` package's."""
    dirs = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    try:
        import ninja  # the PyPI package (a dependency of creditlib): a small binary wheel

        dirs.append(str(ninja.BIN_DIR))
    except Exception:  # noqa: BLE001 - not installed, or an unusual layout: PATH is all there is
        pass
    return [d for d in dirs if d]


def _ensure_ninja() -> bool:
    """True when ``ninja`` runs; appends its folder to ``PATH`` if only :func:`_ninja_dirs` has it
    (torch's build runs ``ninja`` through ``PATH``)."""
    if shutil.which("ninja") is not None:
        return True
    for d in _ninja_dirs():
        if shutil.which("ninja", path=d) is not None:
            path = os.environ.get("PATH", "")
            os.environ["PATH"] = f"{path}{os.pathsep}{d}" if path else d
            return True
    return False


def can_build() -> bool:
    """True when a C++ compiler, ninja and the torch headers are usable and CREDITLIB_NO_BUILD is unset."""
    global _can_build
    if os.environ.get("CREDITLIB_NO_BUILD", "") not in ("", "0"):
        return False
    if _can_build is None:
        ok = shutil.which(_compiler()) is not None
        try:
            from torch.utils import cpp_extension
            ok = ok and _ensure_ninja() and cpp_extension.is_ninja_available()
            ok = ok and any((Path(p) / "torch" / "extension.h").is_file() for p in cpp_extension.include_paths())
        except Exception:  # noqa: BLE001 - any failure here means "cannot build"
            ok = False
        _can_build = bool(ok)
    return _can_build


# ---------------------------------------------------------------------------------------- file lock
if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _wait_lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.2)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def build_lock(bdir: Path) -> Iterator[None]:
    """Hold the build lock of ``bdir`` (waits while another live process builds there).

    The operating system releases it when the holder exits or is killed, so a dead build never
    blocks a later one.
    """
    path = bdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            logger.warning("creditlib: waiting for another process (pid %s) that is building the C++ trace "
                           "kernel in %s", _lock_holder(path), bdir)
            _wait_lock(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear_leftovers(bdir: Path) -> None:
    """Remove what an interrupted build leaves behind (call with the build lock held)."""
    baton = bdir / "lock"  # torch.utils.cpp_extension's FileBaton: a killed build never removes it
    if baton.exists():
        logger.warning("creditlib: removing %s, left by an interrupted build of the C++ trace kernel", baton)
        baton.unlink(missing_ok=True)
    for p in (_marker_path(), _library_path()):  # a library without its marker may be unfinished
        p.unlink(missing_ok=True)


def _build(bdir: Path, verbose: bool):
    """Compile and load the extension (call with the build lock held)."""
    global _build_error
    from torch.utils import cpp_extension

    _clear_leftovers(bdir)
    logger.warning("creditlib: building the C++ trace kernel (once, ~1 min) in %s; "
                   "`python -m creditlib.build_kernels` builds it ahead of time", bdir)
    t0 = time.perf_counter()
    try:
        mod = cpp_extension.load(name=_name(), sources=[str(_SRC)], extra_cflags=cflags(),
                                 build_directory=str(bdir), verbose=verbose)
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised with a way out
        log = bdir / LOG_NAME
        detail = f"{type(e).__name__}: {e}"
        try:
            log.write_text(f"flags: {' '.join(cflags())}\ncompiler: {_compiler()} ({_compiler_version()})\n{detail}\n")
        except OSError:
            pass
        first = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
        _build_error = (
            f"building creditlib's C++ trace kernel failed ({first[:300]}); compiler output in {log}. "
            f"Use backend=\"torch\" (pure PyTorch, no compiler) to avoid the build, or set CREDITLIB_NO_BUILD=1.")
        raise RuntimeError(_build_error) from e
    tmp = _marker_path().with_suffix(".tmp")
    tmp.write_text(f"{_library_path().name}\n")
    os.replace(tmp, _marker_path())
    logger.info("built the C++ trace kernel in %.0f s (%s)", time.perf_counter() - t0, _isa_of(mod))
    return mod


def _isa_of(mod) -> str:
    has = getattr(mod, "has_avx512", None)
    if has is None:
        return "unknown ISA"
    return "AVX-512" if has() else "scalar"


def load(verbose: bool = False):
    """The extension module: the loaded one, the cached build, or a fresh build (about a minute)."""
    global _module
    if ready():
        return _module
    if _build_error is not None:
        raise RuntimeError(_build_error)
    if not can_build():
        raise RuntimeError(
            "creditlib's C++ trace kernel is not built and cannot be built here (no C++ compiler, ninja "
            "or torch headers, or CREDITLIB_NO_BUILD is set); use backend=\"torch\" instead.")
    with _LOCK:
        if _module is not None:
            return _module
        if _build_error is not None:
            raise RuntimeError(_build_error)
        bdir = build_dir()
        with _locked_build_dir(bdir):
            mod = _load_cached()  # another process may have finished the build while this one waited
            _module = mod if mod is not None else _build(bdir, verbose)
    return _module


@contextlib.contextmanager
def _locked_build_dir(bdir: Path) -> Iterator[None]:
    """Create ``bdir`` and hold its build lock; a cache that cannot be written or locked is a
    remembered build error."""
    global _build_error
    try:
        bdir.mkdir(parents=True, exist_ok=True)
        lock = build_lock(bdir)
        lock.__enter__()
    except OSError as e:
        _build_error = (f"creditlib's C++ trace kernel cannot be built: its cache directory {bdir} cannot be "
                        f"created or locked ({e}); set CREDITLIB_CACHE_DIR to a writable local folder, or use "
                        f"backend=\"torch\".")
        raise RuntimeError(_build_error) from e
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def has_avx512() -> bool:
    """Whether the extension (loaded or built now) runs its AVX-512 paths."""
    return bool(load().has_avx512())


def describe() -> str:
    """One line on the loaded extension: ``"AVX-512"`` / ``"scalar"`` and its build flags."""
    mod = load()
    return f"{_isa_of(mod)} ({' '.join(cflags())})"
