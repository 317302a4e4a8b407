"""The fused CPU kernel of the trace scan: the wrapper around the C++ extension.

The kernel is ``csrc/trace_cpu.cpp``; :mod:`creditlib.ops.trace.build` compiles it (JIT at first
use, cached; ``python -m creditlib.build_kernels`` ahead of time) and :func:`load` returns the
loaded extension. This module only calls it, under the calling convention of
:mod:`creditlib.ops.trace`: a kernel whose carries turn non-finite hands the affected rows to
:func:`creditlib.ops.trace.nonfinite_scan`, the rule every backend follows.
"""

from __future__ import annotations

from typing import Optional

import torch

from .build import load

__all__ = ["trace_scan"]


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               sched, transpose: bool) -> torch.Tensor:
    """``z = W x`` (``transpose=False``) or ``W^T x`` with the fused kernel (see ``creditlib.ops.trace``).

    ``sched`` is a :class:`creditlib.ops.trace.Schedule`. Builds the extension on first use if no
    cached build exists.
    """
    mod = load()
    out, nonfinite = _raw_scan(mod, x, mask_u8, cu_seqlens, sched, transpose)
    if not nonfinite:  # every row's last carry is finite: no NaN/inf valid input (checked in the kernel)
        return out
    from . import nonfinite_scan

    return nonfinite_scan(x, mask_u8, cu_seqlens, sched, transpose,
                          lambda *a: _raw_scan(mod, *a)[0], out)  # NaN/inf inputs: the careful path


def _raw_scan(mod, x, mask_u8, cu_seqlens, sched, transpose):
    """The kernel's ``(out, some carry ended non-finite)``."""
    return mod.trace_scan(x, mask_u8, cu_seqlens, float(sched.d), float(sched.eps), sched.L, sched.kind_code,
                          bool(sched.normalize), bool(transpose))
