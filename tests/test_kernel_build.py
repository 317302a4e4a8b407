"""Build reliability of the C++ trace kernel (issue 10, section 4): every build in a subprocess.

* a build killed mid-way (SIGKILL of its whole process group, as Ctrl-C does) leaves torch's lock
  file behind; later builds must recover instead of waiting forever;
* the first build announces itself; a broken compiler makes ``auto`` fall back to PyTorch with one
  warning while ``backend="cpp"`` raises a clear error; the chosen backend is logged once;
* ``python -m creditlib.build_kernels`` builds ahead of time and reports;
* the AVX-512 guard needs AVX-512 F/BW/VL (what the kernel uses), not VBMI;
* the ISA flags (``CREDITLIB_CPU_ISA``).

No full compile of its own: the killed-build test reuses the objects of the native build that
``test_kernel_cpu`` shares, so its recovery only links. The scalar (non-AVX-512) build is compiled
and checked against the dense definition in ``test_packaging.py``, by the torch-only install (one
compile serves both checks).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from creditlib.ops.trace import build

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "creditlib" / "ops" / "trace" / "csrc" / "trace_cpu.cpp"

needs_build = pytest.mark.skipif(not build.can_build(), reason="no C++ compiler / ninja / torch headers here")


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("CREDITLIB_CPU_ISA", "CREDITLIB_NO_BUILD", "CXX"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def _python(code: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(**env), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# A check run in the subprocesses: the C++ kernel against the dense float64 definition.
CHECK = """
    import torch
    import creditlib.functional as F
    from creditlib import DecayStyle
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 70, generator=g, dtype=torch.float64)  # [9, 70]
    lens = torch.randint(0, 71, (9,), generator=g)  # [9]
    lens[0] = 0  # an all-masked row
    right = torch.arange(70)[None, :] < lens[:, None]  # [9, 70]
    for mask in (None, right, right.flip(-1).contiguous(), torch.rand(9, 70, generator=g) < 0.5):
        for style in (DecayStyle("recent", lam=0.95), DecayStyle("both", lam=0.9, eps=0.05), DecayStyle("sequence")):
            for fn in (F.eligibility_trace, F.traced_credit):
                ref = fn(x, mask, style, backend="reference")  # [9, 70]
                for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                    z = fn(x.to(dtype), mask, style, backend="cpp")  # [9, 70]
                    err = (z.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
                    assert err <= tol, (fn.__name__, style, dtype, err)
    print("kernel matches the definition")
"""


# ----------------------------------------------------------------------------------- AVX-512 guard
def _guard_value(march_flags) -> str:
    """``CREDITLIB_AVX512`` as the compiler's preprocessor sees it with these flags."""
    from torch.utils import cpp_extension

    incs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-dM", "-E", *march_flags, *[f"-I{p}" for p in incs], str(SRC)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("#define CREDITLIB_AVX512 ")]
    assert len(lines) == 1, lines
    return lines[0].split()[-1]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None or not build._is_x86(),
                    reason="needs an x86 C++ compiler")
def test_avx512_guard_needs_f_bw_vl_not_vbmi():
    # Skylake-SP and Cascade Lake have AVX-512 F/BW/VL but no VBMI: they must get the AVX-512 paths.
    assert _guard_value(["-march=skylake-avx512"]) == "1"
    assert _guard_value(["-march=cascadelake"]) == "1"
    # AVX2 only (Haswell, Zen 2): the scalar path.
    assert _guard_value(["-march=haswell"]) == "0"
    # The scalar build disables it whatever the CPU.
    assert _guard_value(["-march=icelake-server", "-DCREDITLIB_NO_AVX512"]) == "0"
    assert _guard_value(["-march=icelake-server", "-mno-avx512f"]) == "0"


def test_isa_flags(monkeypatch):
    monkeypatch.setenv("CREDITLIB_CPU_ISA", "scalar")
    assert "-DCREDITLIB_NO_AVX512" in build.cflags()
    monkeypatch.setenv("CREDITLIB_CPU_ISA", "skylake-avx512")
    assert "-march=skylake-avx512" in build.cflags() and "-march=native" not in build.cflags()
    monkeypatch.delenv("CREDITLIB_CPU_ISA")
    assert "-march=native" in build.cflags()
    monkeypatch.setenv("CREDITLIB_CPU_ISA", "native; rm -rf /")
    with pytest.raises(ValueError, match="CREDITLIB_CPU_ISA"):
        build.cflags()


# ---------------------------------------------------------------------------- broken compiler
def test_broken_compiler_auto_falls_back_with_one_warning_and_cpp_raises(tmp_path):
    # CXX=/bin/false: the toolchain looks present, every compile fails. "auto" must warn once and use
    # PyTorch (the same numbers), never raise mid-training; backend="cpp" raises a clear error.
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    code = """
        import logging, sys, warnings
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(levelname)s %(message)s")
        import torch
        import creditlib.functional as F
        from creditlib import DecayStyle
        style = DecayStyle("recent", lam=0.9)
        x = torch.randn(4, 1 << 15)  # [4, 32768]: above the size at which "auto" builds
        mask = torch.rand(4, 1 << 15) < 0.7  # [4, 32768]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z1 = F.eligibility_trace(x, mask, style)
            z2 = F.eligibility_trace(x, mask, style)
            c = F.traced_credit(x, mask, style)
        ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        msg = str(ours[0].message)
        assert "failed" in msg and "build.log" in msg and "pure-PyTorch" in msg, msg
        ref = F.eligibility_trace(x, mask, style, backend="torch")
        assert torch.equal(z1, ref) and torch.equal(z2, ref)
        assert torch.equal(c, F.traced_credit(x, mask, style, backend="torch"))
        try:
            F.eligibility_trace(x, mask, style, backend="cpp")
        except RuntimeError as e:
            assert 'backend="torch"' in str(e) and "build.log" in str(e), e
            print("cpp raised")
        print("ok")
    """
    r = _python(code, 300, CXX=false, CREDITLIB_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and "cpp raised" in r.stdout and "ok" in r.stdout, r.stdout + r.stderr[-3000:]
    # announced once, backend logged once
    assert r.stderr.count("building the C++ trace kernel (once") == 1, r.stderr[-3000:]
    assert r.stderr.count("LOG INFO trace backend \"auto\" -> 'torch' on cpu") == 1, r.stderr[-3000:]
    logs = list(tmp_path.glob("trace_cpu/*/build.log"))
    assert len(logs) == 1 and "false" in logs[0].read_text()


def test_small_inputs_never_build_and_log_the_choice_once(tmp_path):
    code = """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
        import torch
        import creditlib.functional as F
        from creditlib import DecayStyle
        from creditlib.ops.trace import build
        for _ in range(3):
            F.eligibility_trace(torch.randn(2, 16), None, DecayStyle("recent", lam=0.9))
        assert not build.ready()
        print("ok")
    """
    r = _python(code, 120, CREDITLIB_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert r.stderr.count("trace backend \"auto\" -> 'torch'") == 1, r.stderr
    assert "building" not in r.stderr
    assert not list(tmp_path.glob("trace_cpu/*/*.so"))


# ----------------------------------------------------------------------- killed build, stale lock
@needs_build
def test_killed_build_leaves_no_hang(tmp_path):
    # Reuse the native build's objects (shared with test_kernel_cpu): the recovery then only links.
    build.load()
    src = build.build_dir()
    cache = tmp_path / "cache"
    bdir = cache / "trace_cpu" / src.name
    shutil.copytree(src, bdir)  # keeps mtimes: ninja sees the object up to date
    for p in (bdir / build.MARKER_NAME, bdir / build._library_path().name, bdir / build.LOCK_NAME, bdir / "lock"):
        p.unlink(missing_ok=True)

    # A build that is killed while its compiler runs: a compiler wrapper that says when it started,
    # then takes "a minute". `--version` goes straight through, so the build key is the native one.
    started = tmp_path / "compiler-started"
    wrapper = tmp_path / "slow-c++"
    real = shutil.which(os.environ.get("CXX", "c++"))
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "--version" ] && exec {real} "$@"; done\n'
                       f'touch {started}\nsleep 120\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", "from creditlib.ops.trace import build; build.load()"],
                            env=_env(CXX=str(wrapper), CREDITLIB_CACHE_DIR=str(cache)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the build never started its compiler"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, compiler included (what Ctrl-C reaches)
        proc.communicate()
    assert (bdir / "lock").exists(), "the killed build should have left torch's lock file behind"
    assert not (bdir / build.MARKER_NAME).exists()

    # Two processes start at once after the crash: both must finish (no hang on the stale lock), only
    # one builds, and both run the kernel correctly.
    cmd = [sys.executable, "-c", textwrap.dedent(CHECK)]
    env = _env(CREDITLIB_CACHE_DIR=str(cache))
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "kernel matches the definition" in out, err[-3000:]
    errs = "".join(err for _, err in outs)
    assert errs.count("building the C++ trace kernel (once") == 1, errs[-3000:]
    assert "left by an interrupted build" in errs, errs[-3000:]
    assert not (bdir / "lock").exists() and (bdir / build.MARKER_NAME).exists()

    # The ahead-of-time command finds it (and never compiles with --check).
    r = subprocess.run([sys.executable, "-m", "creditlib.build_kernels", "--check"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ready:" in r.stdout and "self-test" in r.stdout, r.stdout + r.stderr[-3000:]


def test_build_command_check_on_an_empty_cache(tmp_path):
    r = subprocess.run([sys.executable, "-m", "creditlib.build_kernels", "--check"],
                       env=_env(CREDITLIB_CACHE_DIR=str(tmp_path)), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "not built" in r.stdout, r.stdout + r.stderr
    assert not list(tmp_path.glob("trace_cpu/*/*.so"))
    r = subprocess.run([sys.executable, "-m", "creditlib.build_kernels", "--isa", "x; y"],
                       env=_env(CREDITLIB_CACHE_DIR=str(tmp_path)), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "CREDITLIB_CPU_ISA" in r.stderr, r.stderr
