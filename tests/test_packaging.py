"""Packaging: ``pip install creditlib`` is torch (+ ninja) only, and every other layer names its extra.

``test_core_install_in_a_fresh_venv`` builds the wheel, installs it with pip into a fresh virtual
environment that holds only torch, and checks there that no heavy package came along, that the
trace, the plain-tensor loss and the C++ kernel build work (the scalar, non-AVX-512 build: CI's
compile and test of that path), and that the TensorDict modules, the TorchRL loss, ``rl``,
``eval`` and the TRL adapter each raise an ImportError naming their extra.

Torch gets into that environment by linking this environment's torch and the packages torch
requires (their files and ``.dist-info`` folders) into the new ``site-packages``: pip then sees an
installed torch, exactly as after ``pip install torch``, without copying ~700 MB. The fresh
environment is *not* made with ``--system-site-packages`` (the system Python may hold numpy, PyYAML
and more). ninja, creditlib's other requirement, is installed by pip from the package index.

The fresh-venv test and the import check in a fresh interpreter are ``slow`` (out of the fast lane,
``pytest -m "not slow"``); the metadata checks run in both lanes.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import creditlib
from creditlib import _extras

ROOT = Path(__file__).resolve().parents[1]

# Distributions that must not come with the core (the extras' packages).
HEAVY = ("tensordict", "torchrl", "transformers", "datasets", "math-verify", "matplotlib", "trl", "accelerate",
         "safetensors", "numpy", "pyyaml", "tqdm", "triton", "verl", "vllm")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomli = pytest.importorskip("tomli")
        return tomli.loads((ROOT / "pyproject.toml").read_text())
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------ metadata, no install
def test_core_requires_torch_and_ninja_only():
    project = _pyproject()["project"]
    names = sorted(_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in project["dependencies"])
    assert names == ["ninja", "torch"], names
    assert project["version"] == creditlib.__version__


def test_extras_declare_what_the_layers_check():
    # Every module a layer's gate looks for (creditlib/_extras.py) is provided by the pyproject extra
    # of the same name (self-references such as creditlib[torchrl,eval] expanded).
    extras = _pyproject()["project"]["optional-dependencies"]
    module_of = {"math-verify": "math_verify", "pyyaml": "yaml"}

    def dists(extra: str) -> set:
        out = set()
        for req in extras[extra]:
            m = re.fullmatch(r"creditlib\[([a-z,]+)\]", req)
            if m:
                for sub in m.group(1).split(","):
                    out |= dists(sub)
            else:
                out.add(_norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]))
        return out

    for extra, modules in _extras.EXTRAS.items():
        provided = {module_of.get(d, d.replace("-", "_")) for d in dists(extra)}
        assert set(modules) <= provided, (extra, set(modules) - provided)
    assert any(re.fullmatch(r"trl>=1[0-9.]*,<2", r) for r in extras["trl"]), extras["trl"]  # below TRL's next major
    for extra in ("torchrl", "rl", "eval", "trl"):
        assert dists(extra) <= dists("all"), (extra, dists(extra) - dists("all"))
    assert "verl" not in dists("all") and "vllm" not in dists("all")  # verl pins tensordict<=0.10
    assert dists("torchrl") | dists("eval") <= dists("rl")  # the recipes use the modules and creditlib.eval


def test_require_names_the_extra(monkeypatch):
    _extras.require("torchrl", "creditlib.modules")  # present here: no error
    monkeypatch.setitem(_extras.EXTRAS, "torchrl", ("torch", "creditlib_no_such_module_x"))
    with pytest.raises(ImportError, match=re.escape("pip install 'creditlib[torchrl]'")) as e:
        _extras.require("torchrl", "a layer")
    assert "creditlib_no_such_module_x" in str(e.value) and e.value.name == "creditlib_no_such_module_x"
    with pytest.raises(ValueError, match="extra must be one of"):
        _extras.require("no-such-extra", "x")
    assert _extras.install_hint("rl") == "pip install 'creditlib[rl]'"


@pytest.mark.slow  # a fresh interpreter
def test_core_imports_no_heavy_package():
    code = """
        import sys
        import creditlib, creditlib.functional, creditlib.losses, creditlib.losses.functional, creditlib.credit
        from creditlib import *
        heavy = [m for m in ("tensordict", "torchrl", "transformers", "datasets", "math_verify", "matplotlib",
                             "trl", "safetensors", "yaml", "verl", "vllm", "triton") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# -------------------------------------------------------------------------------- fresh venv
def _requirement_closure(root: str) -> list:
    """``root`` and every distribution it requires (extras ignored), as installed here."""
    seen, todo, out = set(), [root], []
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform
        out.append(dist)
        for req in dist.requires or []:
            if "extra ==" in req.replace("extra==", "extra =="):
                continue
            todo.append(re.split(r"[<>=!~;\[ (]", req, maxsplit=1)[0])
    return out


def _link_distributions(dists, site: Path) -> None:
    for dist in dists:
        if dist.files is None:
            pytest.fail(f"{dist.metadata['Name']} has no RECORD: cannot link it into the test environment")
        tops = {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}
        for top in tops:
            src = Path(dist.locate_file(top))
            dst = site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src, target_is_directory=src.is_dir())


def _pip(*args, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"pip {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    if importlib_util_find("pip") is None:
        pytest.skip("pip is not installed in this environment")
    tmp = tmp_path_factory.mktemp("core_install")
    # 1. the wheel, built from a copy of the sources (the build writes next to them)
    src = tmp / "src"
    shutil.copytree(ROOT / "creditlib", src / "creditlib", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src))
    wheel = next((tmp / "dist").glob("creditlib-*.whl"))
    # 2. a fresh environment (no system site-packages) with torch and its requirements linked in
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _link_distributions(_requirement_closure("torch"), site)
    # 3. pip install the wheel: the resolver sees torch installed and adds only what creditlib requires
    _pip("--python", str(py), "install", "-q", str(wheel))
    return py


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


CORE_SCRIPT = r"""
import importlib.metadata as md, json, os, sys
import torch

installed = sorted({d.metadata["Name"].lower() for d in md.distributions()})
print("INSTALLED", json.dumps(installed))

import creditlib, creditlib.functional as F
from creditlib import DecayStyle
from creditlib.losses import grpo_lambda_loss
assert creditlib.__file__.startswith(sys.prefix), creditlib.__file__  # the installed wheel, not the checkout

# the trace (pure PyTorch) against the dense definition, with padding and an all-masked row
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 40, generator=g, dtype=torch.float64, requires_grad=True)  # [5, 40]
lens = torch.tensor([40, 17, 0, 1, 33])  # [5]
mask = torch.arange(40)[None, :] < lens[:, None]  # [5, 40]
style = DecayStyle("both", lam=0.9, eps=0.05)
z = F.eligibility_trace(x, mask, style, backend="torch")  # [5, 40]
ref = F.eligibility_trace(x, mask, style, backend="reference")  # [5, 40]
assert torch.allclose(z, ref, atol=1e-12), (z - ref).abs().max()
xs = x.detach()[:, :12].clone().requires_grad_()  # [5, 12]
assert torch.autograd.gradcheck(lambda t: F.eligibility_trace(t, mask[:, :12], style, backend="torch"), (xs,))

# the plain-tensor loss, forward and backward
logp = torch.randn(6, 20, generator=g, requires_grad=True)  # [6, 20]
old = logp.detach() + 0.05 * torch.randn(6, 20, generator=g)  # [6, 20]
adv = F.group_advantage(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]), group_size=3)  # [6]
m = torch.ones(6, 20, dtype=torch.bool)  # [6, 20]
loss, metrics = grpo_lambda_loss(logp, old, adv, m, DecayStyle("recent", lam=0.99))
loss.backward()
assert torch.isfinite(loss) and logp.grad is not None and torch.isfinite(logp.grad).all()
print("CORE OK")

# every other layer names its extra
def expect(stmt, extra):
    try:
        exec(stmt, {})
    except ImportError as e:
        assert f"pip install 'creditlib[{extra}]'" in str(e), (stmt, str(e))
        print("NAMES", extra, "for", stmt)
        return
    raise AssertionError(f"{stmt} imported without creditlib[{extra}]")

expect("import creditlib.modules", "torchrl")
expect("import creditlib; creditlib.TraceAdvantage", "torchrl")
expect("from creditlib.losses import GRPOLambdaLoss", "torchrl")
expect("import creditlib.losses.grpo_lambda", "torchrl")
expect("import creditlib.rl", "rl")
expect("import creditlib.eval", "eval")
expect("import creditlib.integrations.trl", "trl")
import creditlib.integrations.verl  # torch only: works without verl (only register() needs it)
import inspect, pydoc
inspect.getmembers(creditlib)  # help(creditlib) works: no lazy name that needs an extra is listed
pydoc.render_doc(creditlib)
heavy = [m for m in ("tensordict", "torchrl", "transformers", "datasets", "math_verify", "matplotlib", "trl",
                     "safetensors", "numpy", "yaml", "tqdm") if m in sys.modules]
assert not heavy, heavy

# the C++ kernel: can it build with what `pip install creditlib` brought (ninja), venv not activated?
from creditlib.ops.trace import build
print("CAN_BUILD", build.can_build())
"""


@pytest.mark.slow  # builds the wheel, installs it into a fresh venv, builds the scalar kernel there
def test_core_install_in_a_fresh_venv(core_venv, tmp_path):
    py = core_venv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITLIB_", "PYTHON", "VIRTUAL_ENV"))}
    # PATH without this environment's or the new one's bin folder: ninja must be found anyway
    bins = {str(Path(sys.executable).parent), str(py.parent), sysconfig.get_path("scripts")}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in bins)
    env.update({"OMP_NUM_THREADS": "1", "CREDITLIB_CACHE_DIR": str(tmp_path / "cache")})
    r = subprocess.run([str(py), "-c", CORE_SCRIPT], capture_output=True, text=True, timeout=600, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    installed = {_norm(n) for n in __import__("json").loads(r.stdout.split("INSTALLED ", 1)[1].splitlines()[0])}
    assert {"creditlib", "torch", "ninja"} <= installed, installed
    came_along = installed & {_norm(h) for h in HEAVY}
    assert not came_along, came_along
    assert "CORE OK" in r.stdout
    assert r.stdout.count("NAMES ") == 7, r.stdout
    assert (py.parent / ("creditlib-build-kernels" + (".exe" if os.name == "nt" else ""))).exists()

    compiler = shutil.which(os.environ.get("CXX", "c++"), path=env["PATH"])
    if compiler is None:
        assert "CAN_BUILD False" in r.stdout
        return  # no compiler: the pure-PyTorch path above is what this machine runs
    assert "CAN_BUILD True" in r.stdout, r.stdout  # ninja came with the install and is found
    # The C++ kernel builds from the installed wheel's sources with torch alone. It is the scalar
    # build (AVX-512 disabled, what CPUs without AVX-512 run): CI compiles and tests that path here,
    # once; the native build is compiled by test_kernel_cpu. The command self-tests the kernel
    # against the dense definition (3 styles + a floor + normalisation, 4 masks with an all-masked
    # row, forward and transpose, float32 and float64).
    b = subprocess.run([str(py), "-m", "creditlib.build_kernels", "--isa", "scalar"], capture_output=True,
                       text=True, timeout=900, env=env, cwd=tmp_path)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-5000:]
    assert "ready: scalar" in b.stdout and "self-test against the dense definition" in b.stdout, b.stdout
    assert "building the C++ trace kernel (once" in b.stderr
    # A training process that may not compile loads it from the cache, under its own key.
    code = """
import torch
import creditlib.functional as F
from creditlib import DecayStyle
from creditlib.ops.trace import build
x = torch.randn(3, 50, dtype=torch.float64)  # [3, 50]
mask = torch.rand(3, 50) < 0.5  # [3, 50]
style = DecayStyle("recent", lam=0.9, eps=0.05)
z = F.eligibility_trace(x, mask, style, backend="cpp")  # [3, 50]
assert torch.allclose(z, F.eligibility_trace(x, mask, style, backend="reference"), atol=1e-12)
assert not build.has_avx512() and "-DCREDITLIB_NO_AVX512" in build.cflags()
print("KEY", build.build_dir().name)
"""
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**env, "CREDITLIB_CPU_ISA": "scalar", "CREDITLIB_NO_BUILD": "1"})
    assert r.returncode == 0 and "KEY " in r.stdout, r.stdout + r.stderr[-3000:]
    native = subprocess.run([str(py), "-c", "from creditlib.ops.trace import build; print(build.build_dir().name)"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert native.returncode == 0 and native.stdout.strip() != r.stdout.split("KEY ", 1)[1].strip()
