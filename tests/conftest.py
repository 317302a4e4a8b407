"""Shared test setup: offline hubs, deterministic seeds, one thread (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def available_backends():
    """Trace backends that run on this machine's CPU: always "torch"; "cpp" when it can build."""
    out = ["torch"]
    try:
        from creditlib._kernels import cpu

        if cpu.can_build():
            out.append("cpp")
    except Exception:  # pragma: no cover - a broken toolchain is reported by test_kernel_cpu
        pass
    return out
