"""Shared set-up of the trace benchmarks (see benchmarks/README.md).

* one thread (``torch.set_num_threads(1)``), float32, ``B = 64``, ``d = gamma * lam = 0.999``;
* sizes: ``T in {1024, 4096, 16384}``; masks right-padded (lengths in [3T/4, T]) or, for the
  ``@scattered`` variants, the same rows cut into runs (``runs_mask``); a quick mode (``CREDITLIB_BENCH_QUICK=1``, and by default
  under ``--benchmark-disable``) uses ``B = 8``, ``T in {256, 1024}`` so the suite runs as a smoke
  test in seconds (``CREDITLIB_BENCH_QUICK=0`` forces the full sizes);
* the allocator settings (glibc ``MALLOC_*`` variables) and the thread count go into the report
  header and into the JSON's ``machine_info``: they change eager timings by up to 2x.
"""

from __future__ import annotations

import os
import pytest
import torch

torch.set_num_threads(1)

FULL_TS = (1024, 4096, 16384)
QUICK_TS = (256, 1024)
FULL_B = 64
QUICK_B = 8
DECAY = 0.999  # gamma * lam
EPS = 0.05
# name -> (DecayStyle style, eps, normalize); "sequence" ignores the decay, eps and normalize
STYLES = {"recent": ("recent", 0.0, False), "both": ("both", 0.0, False),
          "recent+eps": ("recent", EPS, False), "both+eps": ("both", EPS, False),
          "recent-norm": ("recent", 0.0, True), "both+eps-norm": ("both", EPS, True),
          "sequence": ("sequence", 0.0, False)}
BACKENDS = ("cpp", "torch")
DIRECTIONS = ("fwd", "fwdbwd")
DENSE_MAX_T = 4096  # the dense [T, T] weight matmul only where it fits
TORCHRL_MAX_T = 4096  # TorchRL's conv lambda-return is O(T^2) here (~6 s forward at 16k)
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def quick_mode(config) -> bool:
    env = os.environ.get("CREDITLIB_BENCH_QUICK")
    if env is not None and env != "":
        return env not in ("0", "false", "no")
    try:
        return bool(config.getoption("benchmark_disable"))
    except (ValueError, AttributeError):
        return False


def malloc_settings() -> dict:
    return {k: os.environ.get(k, "(glibc default)") for k in MALLOC_VARS}


def pytest_generate_tests(metafunc):
    if "T" in metafunc.fixturenames:
        ts = QUICK_TS if quick_mode(metafunc.config) else FULL_TS
        metafunc.parametrize("T", ts, ids=[f"T{t}" for t in ts])


def pytest_report_header(config):
    q = quick_mode(config)
    return [f"creditlib bench: threads={torch.get_num_threads()} B={QUICK_B if q else FULL_B} "
            f"T={QUICK_TS if q else FULL_TS} quick={q}",
            "creditlib bench: malloc " + " ".join(f"{k}={v}" for k, v in malloc_settings().items())]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["creditlib"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "quick": quick_mode(config), "malloc": malloc_settings()}


@pytest.fixture(scope="session")
def batch(pytestconfig) -> int:
    return QUICK_B if quick_mode(pytestconfig) else FULL_B


_INPUTS: dict = {}


@pytest.fixture
def inputs(batch, T):
    """(x, mask, g): x, g float32 ``[B, T]``; mask bool ``[B, T]``, right padding, lengths in [3T/4, T]."""
    key = (batch, T)
    if key not in _INPUTS:
        _INPUTS.clear()  # keep one size alive at a time
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(batch, T, generator=gen)  # [B, T]
        g = torch.randn(batch, T, generator=gen)  # [B, T]
        lens = torch.randint(3 * T // 4, T + 1, (batch,), generator=gen)  # [B]
        mask = torch.arange(T)[None, :] < lens[:, None]  # [B, T]
        _INPUTS[key] = (x, mask, g)
    return _INPUTS[key]


def runs_mask(R: int, T: int, lens: torch.Tensor) -> torch.Tensor:
    """bool ``[R, T]``: several runs of valid tokens per row (multi-turn: 194 valid, 97 masked,
    shifted per row) inside the right-padded lengths ``lens`` ``[R]``."""
    ar = torch.arange(T)  # [T]
    runs = ((ar[None, :] // 97 + torch.arange(R)[:, None]) % 3) != 0  # [R, T]
    return runs & (ar[None, :] < lens[:, None])


@pytest.fixture
def scattered(inputs):
    """The ``inputs`` with a scattered mask instead: the same rows cut into runs (``runs_mask``)."""
    x, mask, g = inputs
    return x, runs_mask(x.shape[0], x.shape[1], mask.sum(-1)), g


_BACKEND_STATUS: dict = {}


def backend_status(backend: str):
    """``None`` when ``backend`` can be benchmarked, else the reason to skip (checked once): only a
    C++ kernel that cannot be built here is skipped. A backend that stops scaling as O(T) is not
    skipped: ``test_bench_trace.py::test_scales_linearly`` fails for it."""
    if backend in _BACKEND_STATUS:
        return _BACKEND_STATUS[backend]
    from creditlib import functional as F
    from creditlib.style import DecayStyle

    reason = None
    style = DecayStyle("recent", gamma=1.0, lam=DECAY)
    if backend == "cpp":
        from creditlib.ops.trace import build
        if not (build.ready() or build.can_build()):
            reason = "the C++ kernel cannot be built here (no compiler / toolchain)"
        else:
            try:  # builds once (cached on disk), then checks it runs
                F.eligibility_trace(torch.randn(2, 64), None, style, backend="cpp")
            except Exception as e:  # noqa: BLE001 - any build failure means skip
                reason = f"the C++ kernel failed to build or run: {type(e).__name__}: {str(e)[:200]}"
    _BACKEND_STATUS[backend] = reason
    return reason
