"""The trace scan ``z = W x`` (or ``W^T x``): the dispatcher over its backends, one calling convention.

Files: ``naive.py`` (the dense definition), ``torch_scan.py`` (pure PyTorch), ``cpu.py`` (the
fused C++ kernel's wrapper; ``build.py`` builds ``csrc/trace_cpu.cpp``), ``triton_kernel.py`` (CUDA).

``trace_scan(x, mask_u8, cu_seqlens, sched, transpose, backend)``

* padded: ``x`` ``[R, T]`` contiguous, ``mask_u8`` ``[R, T]`` uint8 (a view of the bool mask; any
  nonzero byte is a valid token) or ``None`` (all valid), ``cu_seqlens`` ``None``;
* packed: ``x`` ``[N]`` contiguous, ``mask_u8`` ``None``, ``cu_seqlens`` int64 ``[S+1]``.

``sched`` is a :class:`Schedule`: everything a kernel needs about the weights, built once from the
:class:`~creditlib.DecayStyle` (kind, ``d = gamma * lam`` as a Python float64, ``eps``, the floor
window ``L``, ``normalize``) and handed to each backend as is. ``transpose`` applies ``W^T``
(backward pass / forward-view credit). Output: the shape and dtype of ``x``, 0 at masked
positions; half types accumulate in float32, float64 stays float64.

Non-finite inputs. Masked inputs are never read. A NaN or inf at a *valid* token reaches exactly
the outputs whose weight includes it (``w(t, j) > 0`` as a real number, before any float
underflow): every later valid token for ``d > 0`` or a floor (the transpose: every earlier one),
only the token itself (and, for ``"both"``, the later tokens through ``w(t, 0) = 1``) when
``d = 0`` without a floor, the whole row for ``"sequence"``. Every backend gives the same value
there (weights are positive, so an infinity keeps its sign): an output reached only by ``-inf``
inputs is exactly ``-inf`` (only by ``+inf``: ``+inf``); one reached by a NaN, or by both signs,
is NaN; every other valid output is the finite trace of the finite inputs (never NaN from an
infinity elsewhere in the row). See :func:`nonfinite_scan`: the kernels notice a non-finite input
at no extra pass (their carries turn non-finite) and only then take that careful path.

Backends: ``"cpp"`` (fused CPU kernel, JIT-built once and cached), ``"triton"`` (CUDA),
``"torch"`` (pure PyTorch, no compiler), ``"reference"`` (dense O(T^2), tests only) and
``"auto"``: the fastest that is ready for the tensor's device, never paying a C++ build for a small
input (see :func:`choose_backend`). The ``d = 0`` schedules without a floor are closed forms
(identity, or ``x_t + x_0`` for ``"both"``) evaluated here for every backend.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("recent", "both", "sequence")


@dataclass(frozen=True)
class Schedule:
    """The trace weights as the kernels see them (build with :meth:`of` or :meth:`make`).

    Attributes:
        kind: ``"recent"``, ``"both"`` or ``"sequence"``.
        d: ``gamma * lam`` (Python float64; never rounded to float32).
        eps: weight floor.
        normalize: divide row ``t`` by ``N_t = sum_{i<=t} w(t, i)`` (see :meth:`row_sums`).
        window: ``L``, the largest lag with ``d**L >= eps`` (``None``: the floor never binds).
    """

    kind: str
    d: float
    eps: float
    normalize: bool
    window: Optional[int]

    @staticmethod
    def of(style) -> "Schedule":
        """The schedule of a :class:`~creditlib.DecayStyle`."""
        return Schedule.make(style.style, style.decay, style.eps, style.normalize)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def make(kind: str, d: float, eps: float, normalize: bool) -> "Schedule":
        """From primitives (what the custom op's schema carries); validated, cached."""
        from ...style import decay_window

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        d, eps = float(d), float(eps)
        if not (0.0 <= d <= 1.0) or not (0.0 <= eps <= 1.0):
            raise ValueError(f"d and eps must be in [0, 1], got d={d!r}, eps={eps!r}")
        if kind == "sequence":  # gamma, lam, eps, normalize are ignored: rows already sum to 1
            return Schedule("sequence", 1.0, 0.0, False, None)
        return Schedule(kind, d, eps, bool(normalize), decay_window(d, eps))

    @property
    def both(self) -> bool:
        return self.kind == "both"

    @property
    def sequence(self) -> bool:
        return self.kind == "sequence"

    @property
    def kind_code(self) -> int:
        """0 recent, 1 both, 2 sequence (the C++ kernel's argument)."""
        return KINDS.index(self.kind)

    @property
    def L(self) -> int:
        """The window as the C++ kernel takes it: -1 when the floor never binds."""
        return -1 if self.window is None else min(int(self.window), 1 << 62)

    def style(self):
        """The :class:`~creditlib.DecayStyle` of these weights (for the dense reference)."""
        from ...style import DecayStyle

        return DecayStyle(self.kind, gamma=1.0, lam=self.d, eps=self.eps, normalize=self.normalize)

    def closed_form(self) -> Optional[str]:
        """``"identity"`` or ``"both0"`` for the ``d = 0`` schedules without a floor, else None."""
        if self.sequence or self.d != 0.0 or self.eps != 0.0:
            return None
        return "both0" if self.both else "identity"

    def support(self) -> "Schedule":
        """A schedule with the same nonzero pattern and weights 1 (where ``w(t, j) != 0``)."""
        if self.sequence:
            return self
        return Schedule.make(self.kind, 1.0 if self.d > 0 else 0.0, 1.0 if self.eps > 0 else 0.0, False)

    def row_sums(self, n: int, device=None) -> torch.Tensor:
        """``N_k = sum_{i<=k} w(k, i)`` for valid positions ``k = 0..n-1``, float64 ``[n]``.

        With ``f(m) = d**m`` for ``m <= L`` (every ``m`` without a floor) and ``eps`` beyond, and
        ``F(h) = sum_{m<h} f(m)``: ``recent`` ``N_k = F(k+1)``; ``both`` (``w = f(min(k-i, i))``)
        ``N_k = 2 F(ceil(k/2)) + [k even] f(k/2)``. Running sums in float64 (relative error
        ``<= n 2^-53``), no ``d**-k``: nothing overflows at any ``n``.
        """
        return _row_sums(self, int(n)).to(device) if device is not None else _row_sums(self, int(n))

    def inv_row_sums(self, n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """``1 / N_k`` (``[n]``) computed in float64, then cast to ``dtype``."""
        return _inv_row_sums(self, int(n), dtype, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=8)
def _row_sums(s: Schedule, n: int) -> torch.Tensor:
    m = torch.arange(n + 1, dtype=torch.float64)  # [n+1] lags
    f = torch.pow(torch.tensor(s.d, dtype=torch.float64), m)  # [n+1] d^m (0^0 = 1)
    if s.window is not None:
        f = torch.where(m > s.window, torch.full_like(f, s.eps), f)
    F = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(f, 0)])  # [n+2] F(h) = sum_{m<h} f(m)
    k = torch.arange(n)  # [n]
    if s.kind == "recent":
        return F[k + 1]  # [n]
    even = (k % 2 == 0).to(torch.float64)
    return 2 * F[(k + 1) // 2] + even * f[k // 2]  # [n]


@functools.lru_cache(maxsize=8)
def _inv_row_sums(s: Schedule, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (1.0 / _row_sums(s, n)).to(dtype=dtype, device=device)  # [n]


BACKENDS = ("auto", "cpp", "triton", "torch", "reference")

# "auto" builds the C++ extension only for inputs at least this large (elements); smaller inputs
# use the pure-PyTorch path until a build exists (a cold build takes tens of seconds).
AUTO_BUILD_MIN_NUMEL = int(os.environ.get("CREDITLIB_AUTO_BUILD_MIN_NUMEL", 1 << 16))


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_log = logging.getLogger("creditlib")
_logged_choices: set = set()
_auto_build_failed = False


def _chosen(backend: str, device: str, why) -> str:
    """Log the first choice of each backend per device type (INFO, logger "creditlib"); ``why`` is
    a string or a function giving one (called only when logging)."""
    if (device, backend) not in _logged_choices:
        _logged_choices.add((device, backend))
        _log.info("trace backend \"auto\" -> %r on %s (%s)", backend, device, why() if callable(why) else why)
    return backend


def choose_backend(x: torch.Tensor) -> str:
    """The backend ``"auto"`` resolves to for this input.

    * CUDA: ``"triton"`` when Triton is usable, else ``"torch"``.
    * CPU: ``"cpp"`` when the C++ kernel is loaded or a complete cached build exists. Otherwise, for
      an input of at least ``AUTO_BUILD_MIN_NUMEL`` elements (env ``CREDITLIB_AUTO_BUILD_MIN_NUMEL``)
      where a compiler, ninja and the torch headers are usable, the kernel is built here (once,
      about a minute, announced on stderr) and ``"cpp"`` is returned. Smaller inputs, and machines
      that cannot build, get ``"torch"``.
    * A build that fails gives one ``RuntimeWarning`` and ``"torch"`` for the rest of the process,
      never an error mid-training (an explicit ``backend="cpp"`` raises the build error instead).

    The first choice of each backend is logged at INFO on the ``"creditlib"`` logger.
    """
    global _auto_build_failed
    if x.is_cuda:
        triton_kernel = _optional("triton_kernel")
        if triton_kernel is not None and triton_kernel.available():
            return _chosen("triton", "cuda", "Triton kernel")
        return _chosen("torch", "cuda", "Triton is not available")
    if x.device.type != "cpu":
        return _chosen("torch", x.device.type, "no fused kernel for this device")
    build = _optional("build")
    if build is None:
        return _chosen("torch", "cpu", "the C++ backend module could not be imported")
    if build.ready():
        return _chosen("cpp", "cpu", lambda: f"fused C++ kernel, {build._isa_of(build.load())}")
    if build.build_error() is not None or _auto_build_failed:
        return _chosen("torch", "cpu", "the C++ kernel build failed")
    if x.numel() < AUTO_BUILD_MIN_NUMEL:
        return _chosen("torch", "cpu", f"no C++ build cached; inputs of {AUTO_BUILD_MIN_NUMEL} elements or more build it")
    if not build.can_build():
        return _chosen("torch", "cpu", "no C++ build cached and none possible here: C++ compiler, ninja or torch "
                                       "headers missing, or CREDITLIB_NO_BUILD set")
    try:
        mod = build.load()
    except Exception as e:  # noqa: BLE001 - a broken toolchain must not stop a training run
        _auto_build_failed = True  # never retried by "auto" in this process, and warned about once
        warnings.warn(f"{e} backend=\"auto\" uses the pure-PyTorch trace for the rest of this process.",
                      RuntimeWarning, stacklevel=2)
        return _chosen("torch", "cpu", "the C++ kernel build failed")
    return _chosen("cpp", "cpu", f"fused C++ kernel, {build._isa_of(mod)}")


def _optional(name: str):
    """A compiled-backend module, or None when it cannot even be imported (e.g. a partial install)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def trace_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               sched: Schedule, transpose: bool, backend: str = "auto") -> torch.Tensor:
    if not isinstance(sched, Schedule):
        raise ValueError(f"sched must be a creditlib.ops.trace.Schedule, got {type(sched).__name__}")
    if backend == "auto":
        backend = choose_backend(x)
    check_backend(backend)
    if x.numel() == 0:
        return torch.zeros_like(x)
    cf = sched.closed_form()
    if cf is not None and backend != "reference":
        return closed_form_scan(x, mask_u8, cu_seqlens, cf, sched.normalize, transpose)
    if backend == "cpp":
        from . import cpu
        return cpu.trace_scan(x, mask_u8, cu_seqlens, sched, transpose)
    if backend == "triton":
        from . import triton_kernel
        return triton_kernel.trace_scan(x, mask_u8, cu_seqlens, sched, transpose)
    if backend == "torch":
        from . import torch_scan
        return torch_scan.trace_scan(x, mask_u8, cu_seqlens, sched, transpose)
    return reference_scan(x, mask_u8, cu_seqlens, sched, transpose)


def nonfinite_classes(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``[3, *x.shape]`` indicators of the valid ``+inf``, ``-inf`` and NaN inputs.

    ``valid``: bool of ``x``'s shape, or None (all valid)."""
    cls = torch.stack([x == float("inf"), x == float("-inf"), torch.isnan(x)])  # [3, *x.shape]
    if valid is not None:
        cls &= valid
    return cls.to(torch.float32)


def place_nonfinite(z: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """Put the non-finite values into ``z`` (the trace of the finite inputs, non-finite ones as 0).

    ``reach``: ``[3, *z.shape]``, the support-weighted counts of the ``+inf``, ``-inf`` and NaN inputs
    reaching each output (:func:`nonfinite_classes` traced with :meth:`Schedule.support`): +inf where
    only +inf reaches, -inf where only -inf does, NaN where a NaN or both signs do."""
    pos, neg, nan = reach[0] > 0.5, reach[1] > 0.5, reach[2] > 0.5  # [*z.shape] each
    z = z.masked_fill(pos, float("inf")).masked_fill_(neg, float("-inf"))
    return z.masked_fill_(nan | (pos & neg), float("nan"))


def nonfinite_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                   sched: Schedule, transpose: bool, scan, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The trace of an input that holds NaN/inf at valid tokens, with every backend's pattern.

    ``scan(x, mask_u8, cu_seqlens, sched, transpose)`` is a backend's scan of finite inputs. Padded
    rows with all-finite valid inputs are left out; the others are scanned with their non-finite
    inputs replaced by 0, and the three classes (+inf, -inf, NaN) are traced as 0/1 indicators with
    the support weights (one stacked call) to place the non-finite outputs (:func:`place_nonfinite`).
    Costs about four scans of the affected rows; only called once a kernel saw a non-finite carry.
    ``out``: that kernel's output for all of ``x`` when at hand (kept for the unaffected rows).
    """
    if cu_seqlens is None:
        valid = None if mask_u8 is None else mask_u8 != 0  # [R, T]
        fin = torch.isfinite(x)  # [R, T]
        bad_row = ~(fin if valid is None else fin | ~valid).all(-1)  # [R]
        rows = bad_row.nonzero()[:, 0]  # [R'] rows holding a non-finite valid input
        if rows.numel() < x.shape[0]:  # rows without one: the plain scan (unless overflow, finite)
            if out is None:
                out = scan(x, mask_u8, None, sched, transpose)  # [R, T]
            if rows.numel() == 0:
                return out
            sub = nonfinite_scan(x[rows].contiguous(), None if mask_u8 is None else mask_u8[rows].contiguous(),
                                 None, sched, transpose, scan)  # [R', T]
            return out.index_copy_(0, rows, sub)
        xf = torch.where(fin, x, torch.zeros((), dtype=x.dtype, device=x.device))  # [R, T]
        z = scan(xf, mask_u8, None, sched, transpose)  # [R, T]
        ind = nonfinite_classes(x, valid).reshape(3 * x.shape[0], x.shape[1])  # [3R, T]
        m3 = None if mask_u8 is None else mask_u8.repeat(3, 1)  # [3R, T]
        reach = _support_scan(ind, m3, None, sched, transpose, scan).view(3, *x.shape)  # [3, R, T]
        return place_nonfinite(z, reach)
    fin = torch.isfinite(x)  # [N]
    xf = torch.where(fin, x, torch.zeros((), dtype=x.dtype, device=x.device))  # [N]
    z = scan(xf, None, cu_seqlens, sched, transpose)  # [N]
    ind = nonfinite_classes(x, None).reshape(-1)  # [3N]
    N = x.numel()
    cu = cu_seqlens.to(torch.int64)
    cu3 = torch.cat([cu[:-1], cu[:-1] + N, cu + 2 * N])  # [3S+1] the three copies back to back
    reach = _support_scan(ind, None, cu3, sched, transpose, scan).view(3, N)  # [3, N]
    return place_nonfinite(z, reach)


def _support_scan(ind, mask_u8, cu_seqlens, sched: Schedule, transpose: bool, scan) -> torch.Tensor:
    """``ind`` traced with the 0/1 weights of ``sched``'s support: counts of the reaching inputs
    (exact below 2^24; for ``"sequence"``, whose weights are ``1/n``, 1 where any reaches)."""
    sup = sched.support()
    cf = sup.closed_form()
    if cf is not None:
        return closed_form_scan(ind, mask_u8, cu_seqlens, cf, False, transpose)
    reach = scan(ind, mask_u8, cu_seqlens, sup, transpose)
    if sup.sequence:  # the row mean of the indicators: >= 1/n > 0 exactly where some input reaches
        return (reach > 0).to(reach.dtype)
    return reach


def closed_form_scan(x: torch.Tensor, mask_u8: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                     form: str, normalize: bool, transpose: bool) -> torch.Tensor:
    """The ``d = 0`` schedules without a floor, exactly (no ``0 * x`` products: NaN/inf reach only
    the outputs whose weight includes them).

    ``"identity"``: ``z_t = x_t``. ``"both0"``: ``w(t, j) = 1`` for ``j = t`` and ``j = 0``, else
    0, so ``z_t = x_t + [t > 0] x_0`` and ``g_j = y_j + [j = 0] sum_{t > 0} y_t``; normalised,
    every row ``t > 0`` sums to 2.
    """
    if cu_seqlens is not None:  # packed -> padded [S, Tmax]
        xp, mask, _ = varlen_to_padded(x, cu_seqlens)  # [S, Tmax]
        zp = closed_form_scan(xp.contiguous(), mask.view(torch.uint8), None, form, normalize, transpose)
        return zp[mask]  # [N]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = torch.ones_like(x, dtype=torch.bool) if mask_u8 is None else mask_u8 != 0  # [R, T]
    xv = torch.where(valid, x.to(cd), torch.zeros((), dtype=cd, device=x.device))  # [R, T]
    if form == "identity":
        return xv.to(x.dtype)
    k = torch.cumsum(valid, dim=-1) - 1  # [R, T] valid-token index
    first = valid & (k == 0)  # [R, T] the first valid token of each row
    later = valid & (k > 0)  # [R, T]
    if not transpose:
        x0 = torch.where(first, xv, torch.zeros_like(xv)).sum(-1, keepdim=True)  # [R, 1]
        z = xv + torch.where(later, x0.expand_as(xv), torch.zeros_like(xv))  # [R, T]
        if normalize:
            z = torch.where(later, z * 0.5, z)
        return z.to(x.dtype)
    y = torch.where(later, xv * 0.5, xv) if normalize else xv  # [R, T] y_t / N_t
    rest = torch.where(later, y, torch.zeros_like(y)).sum(-1, keepdim=True)  # [R, 1] sum_{t>0} y_t
    g = y + torch.where(first, rest.expand_as(y), torch.zeros_like(y))  # [R, T]
    return g.to(x.dtype)


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


def reference_scan(x, mask_u8, cu_seqlens, sched: Schedule, transpose: bool):
    """The dense O(T^2) definition (``naive.py``) under the kernels' calling convention."""
    from .naive import eligibility_trace_naive

    style = sched.style()
    if cu_seqlens is not None:
        xp, mask, _ = varlen_to_padded(x, cu_seqlens)
        zp = eligibility_trace_naive(xp, mask, style, transpose=transpose)  # [S, Tmax]
        return zp[mask]  # [N]
    mask = torch.ones_like(x, dtype=torch.bool) if mask_u8 is None else mask_u8 != 0  # [R, T]
    return eligibility_trace_naive(x, mask, style, transpose=transpose)
