"""``benchmarks/gpu_check.py`` on CPU at tiny sizes: its validation, timing and recipe-step logic.

The script is written for a CUDA machine; ``--device cpu --quick`` runs the same code paths with
the CPU backends (and the Triton kernel under ``TRITON_INTERPRET=1``, in a child process since the
interpreter must be chosen before triton is imported), and the recipe step with the transformers
rollout (the same command as the vLLM one but ``--rollout hf``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("creditlib_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_cpu_smoke(tmp_path):
    """The whole script, CPU, tiny sizes: every case within tolerance, timings and JSON written,
    the recipe step (transformers rollout) runs one RL step."""
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--lengths", "256,1024", "--numel", "2048",
           "--reps", "1", "--dtypes", "float32", "--recipe-rollout", "hf", "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rep = json.loads(out.read_text())
    assert "triton" in rep["backends"] and "torch" in rep["backends"]
    assert rep["validation_failures"] == 0
    seen = {(r["backend"], r["style"], r["mask"], r["dtype"]) for r in rep["validation"] if r["check"] == "value"}
    styles = {s[0] for s in _load().STYLES}
    for be in ("triton", "torch"):
        for st in styles:
            for mk in ("none", "right", "left", "runs", "random", "empty-rows", "varlen"):
                assert (be, st, mk, "float32") in seen
    assert any(r["check"] == "grad" and r["backend"] == "triton" for r in rep["validation"])
    assert any(r["check"].startswith("long") and r["backend"] == "triton" for r in rep["validation"])
    assert any(r["check"] == "split" for r in rep["validation"])
    timed = [r for r in rep["timings"] if "ms" in r]
    assert {r["T"] for r in timed} == {256, 1024} and all(r["x_clone"] > 0 and r["bw_share"] > 0 for r in timed)
    assert any(r.get("few_rows") for r in timed)
    assert rep["recipe"]["status"] == "ok" and rep["recipe"]["rl_rows"] >= 1, rep["recipe"]
    assert "validation:" in p.stdout and "recipe step (--rollout hf): ok" in p.stdout


def test_gpu_check_flags_a_wrong_backend(monkeypatch):
    """The validation fails a backend whose result is wrong (here: the torch backend off by 1e-3
    at one position), so a broken kernel cannot pass the check."""
    gc = _load()
    import torch

    real = gc.trace_scan

    def off(x, mask_u8, cu, sched, transpose, backend="auto"):
        z = real(x, mask_u8, cu, sched, transpose, backend=backend)
        if backend == "torch" and z.numel():
            z = z.clone()
            z.view(-1)[0] += 1e-3
        return z

    monkeypatch.setattr(gc, "trace_scan", off)
    rows = gc.validate(torch.device("cpu"), ["torch"], 2, 16)
    f32 = [r for r in rows if r["check"] == "value" and r["dtype"] == "float32"]
    assert f32 and any(not r["ok"] for r in f32)
    # the none-masked rows have a valid position 0, so every one of them must be caught
    assert all(not r["ok"] for r in f32 if r["mask"] == "none")
