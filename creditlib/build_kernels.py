"""Build creditlib's C++ trace kernel ahead of time.

Without this, the first large CPU trace (``backend="auto"``) or the first ``backend="cpp"`` call
compiles the kernel: about a minute, once per machine, torch version and compiler. Run the command
in a Docker image layer, a cluster's setup step or CI's install step instead::

    python -m creditlib.build_kernels              # build (or find) the kernel for this CPU and self-test it
    python -m creditlib.build_kernels --check      # report only, never compile; exit 1 if nothing is cached
    python -m creditlib.build_kernels --isa scalar # the portable build without AVX-512 (CREDITLIB_CPU_ISA)
    creditlib-build-kernels                        # the same command, installed with the package

The build lands in the cache that training processes read (``CREDITLIB_CACHE_DIR``, default
``~/.cache/creditlib``), keyed by the source, torch, Python, compiler, flags and CPU: build it with
the same environment and on the same kind of CPU as the training runs (``--isa native``, the
default, targets this CPU; ``--isa skylake-avx512`` or ``--isa x86-64-v3`` target others). After
building, the kernel is checked against the dense definition on a few masks and styles.

Exit status: 0 when a kernel is ready and matches the definition; 1 when none is cached
(``--check``), none can be built here (no C++ compiler, ninja or torch headers, or
``CREDITLIB_NO_BUILD`` set), the build failed (the message names the compiler log), or the
self-test failed; 2 for a bad ``--isa``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

__all__ = ["main", "self_test"]


def self_test() -> float:
    """Max relative error of the C++ kernel against the dense float64 definition (forward and
    transpose; no mask, right/left padding, several runs per row, an all-masked row; the three
    styles, a floor, row normalisation), float32 and float64. Raises AssertionError past 1e-5."""
    import torch

    from . import functional as F
    from .style import DecayStyle

    g = torch.Generator().manual_seed(0)
    R, T = 19, 97
    x = torch.randn(R, T, generator=g, dtype=torch.float64)  # [R, T]
    lens = torch.randint(0, T + 1, (R,), generator=g)  # [R]
    lens[0] = 0  # an all-masked row
    right = torch.arange(T)[None, :] < lens[:, None]  # [R, T]
    masks = [None, right, right.flip(-1).contiguous(), torch.rand(R, T, generator=g) < 0.6]  # [R, T] each
    styles = [DecayStyle("recent", lam=0.95), DecayStyle("both", lam=0.9, eps=0.05),
              DecayStyle("recent", lam=0.99, normalize=True), DecayStyle("sequence")]
    worst = 0.0
    for style in styles:
        for mask in masks:
            for fn in (F.eligibility_trace, F.traced_credit):
                ref = fn(x, mask, style, backend="reference")  # [R, T] float64
                scale = max(1.0, ref.abs().max().item())
                for dtype in (torch.float64, torch.float32):
                    z = fn(x.to(dtype), mask, style, backend="cpp")  # [R, T]
                    err = (z.double() - ref).abs().max().item() / scale
                    assert err <= 1e-5, f"{fn.__name__} {style} {dtype}: relative error {err:.2e}"
                    worst = max(worst, err)
    return worst


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m creditlib.build_kernels",
        description="Build creditlib's C++ trace kernel ahead of time (otherwise the first large CPU "
                    "trace builds it, about a minute).")
    parser.add_argument("--check", action="store_true",
                        help="only report whether a usable build is cached (exit 1 if not); never compile")
    parser.add_argument("--isa", default=None,
                        help="native (default), scalar (no AVX-512) or a -march value; sets CREDITLIB_CPU_ISA")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    if args.isa is not None:
        os.environ["CREDITLIB_CPU_ISA"] = args.isa

    from .ops.trace import build

    try:
        flags = " ".join(build.cflags())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"creditlib C++ trace kernel: isa {build.isa()} ({flags}); cache {build.build_dir()}")
    if args.check:
        if not build.ready():
            print("not built (run `python -m creditlib.build_kernels` to build it)")
            return 1
    elif not build.ready() and not build.can_build():
        print("error: not built, and it cannot be built here: a C++ compiler (CXX, default c++), ninja and "
              "the torch headers are needed, and CREDITLIB_NO_BUILD must be unset", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        build.load(verbose=args.verbose)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ready: {build.describe()} ({time.perf_counter() - t0:.1f} s)")
    try:
        err = self_test()
    except AssertionError as e:
        print(f"error: the kernel disagrees with the dense definition: {e}", file=sys.stderr)
        return 1
    print(f"self-test against the dense definition: max relative error {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
