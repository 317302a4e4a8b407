"""Backends of the trace scan ``z = W x`` (or ``W^T x``), all with one calling convention.

``trace_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose, backend)``

* padded: ``x`` ``[R, T]`` contiguous, ``mask_u8`` ``[R, T]`` uint8 (a view of the bool mask)
  or ``None`` (all valid), ``cu_seqlens`` ``None``;
* packed: ``x`` ``[N]`` contiguous, ``mask_u8`` ``None``, ``cu_seqlens`` int64 ``[S+1]``.

``d = gamma * lam`` and ``eps`` are Python floats (float64); ``both`` selects the ``"both"``
style; ``transpose`` applies ``W^T`` (backward pass / forward-view credit). Output: the shape and
dtype of ``x``, 0 at masked positions; half types accumulate in float32, float64 stays float64.

Backends: ``"cpp"`` (fused CPU kernel, JIT-built once and cached), ``"triton"`` (CUDA),
``"torch"`` (pure PyTorch, no compiler), ``"reference"`` (dense O(T^2), tests only) and
``"auto"``: the fastest that is ready for the tensor's device, never paying a C++ build for a small
input (see :func:`choose_backend`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "cpp", "triton", "torch", "reference")

# "auto" builds the C++ extension only for inputs at least this large (elements); smaller inputs
# use the pure-PyTorch path until a build exists (a cold build takes tens of seconds).
AUTO_BUILD_MIN_NUMEL = int(os.environ.get("CREDITLIB_AUTO_BUILD_MIN_NUMEL", 1 << 16))


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def choose_backend(x: torch.Tensor) -> str:
    """The backend ``"auto"`` resolves to for this input."""
    if x.is_cuda:
        triton_trace = _optional("triton_trace")
        return "triton" if triton_trace is not None and triton_trace.available() else "torch"
    if x.device.type == "cpu":
        cpu = _optional("cpu")
        if cpu is not None and cpu.ready():
            return "cpp"
        if cpu is not None and x.numel() >= AUTO_BUILD_MIN_NUMEL and cpu.can_build():
            return "cpp"
    return "torch"


def _optional(name: str):
    """A compiled-backend module, or None when it cannot even be imported (e.g. a partial install)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               d: float, eps: float, both: bool, transpose: bool, backend: str = "auto") -> torch.Tensor:
    if backend == "auto":
        backend = choose_backend(x)
    if backend == "cpp":
        from . import cpu
        return cpu.trace_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose)
    if backend == "triton":
        from . import triton_trace
        return triton_trace.trace_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose)
    if backend == "torch":
        from . import torch_scan
        return torch_scan.trace_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose)
    if backend == "reference":
        return reference_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def varlen_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor):
    """packed ``[N]`` + ``cu`` ``[S+1]`` -> (``[S, Tmax]`` values, ``[S, Tmax]`` bool mask, index)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1])  # [S]
    S = lens.numel()
    Tmax = int(lens.max()) if S else 0
    ar = torch.arange(Tmax, device=x.device)  # [Tmax]
    mask = ar[None, :] < lens[:, None]  # [S, Tmax]
    idx = (cu_seqlens[:-1, None] + ar[None, :]).clamp_max(max(x.numel() - 1, 0))  # [S, Tmax]
    xp = torch.where(mask, x[idx], torch.zeros((), dtype=x.dtype, device=x.device))  # [S, Tmax]
    return xp, mask, idx


def reference_scan(x, mask_u8, cu_seqlens, d, eps, both, transpose):
    from .._reference import eligibility_trace_naive
    from ..style import DecayStyle

    style = DecayStyle("both" if both else "recent", gamma=1.0, lam=d, eps=eps)
    if cu_seqlens is not None:
        xp, mask, _ = varlen_to_padded(x, cu_seqlens)
        zp = eligibility_trace_naive(xp, mask, style, transpose=transpose)  # [S, Tmax]
        return zp[mask]  # [N]
    mask = torch.ones_like(x, dtype=torch.bool) if mask_u8 is None else mask_u8.view(torch.bool)
    return eligibility_trace_naive(x, mask, style, transpose=transpose)
