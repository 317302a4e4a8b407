"""Checkpoints in safetensors: model, optimizer, RNG, step and data position.

Layout of ``<output_dir>/checkpoints/step_000040/``::

    model.safetensors          full (unsharded) model weights; tied weights stored once
    optimizer.safetensors      optimizer state, keyed by parameter name; param_groups in the metadata
    rng_rank{r}.safetensors    torch CPU (and CUDA) generator states of rank r, python/numpy in metadata
    trainer_state.json         step, data position, phase results, config

A checkpoint is written into ``step_N.tmp`` and renamed when complete, then ``latest`` (a text
file naming it) is replaced atomically: a run killed while saving leaves the previous checkpoint
intact. Under FSDP2 every rank takes part in gathering the full state dicts and rank 0 writes.
Parameters are checked to be finite first: a checkpoint never holds NaN/inf weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import DistInfo, barrier, reshard

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_trainer_state", "save_weights", "load_weights",
           "model_state_dict", "NonFiniteWeightsError"]


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN/inf parameters: no checkpoint is written."""


def _full_options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def model_state_dict(model: torch.nn.Module, info: DistInfo, every_rank: bool = False) -> dict:
    """Full (unsharded) model state dict; collective under FSDP2 (every rank must call it).

    Default: on CPU, and under FSDP2 only rank 0 receives the tensors (the others get ``{}``).
    ``every_rank=True``: every rank receives the full tensors on their device (vLLM weight sync).
    """
    if info.enabled:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        reshard(model)
        return get_model_state_dict(model, options=_full_options(cpu_offload=not every_rank))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _dedupe(sd: dict):
    """Drop tensors that share storage with an earlier key (tied embeddings); return aliases."""
    out, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride())) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.contiguous()
    return out, aliases


def save_weights(sd: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
    """Save a state dict with safetensors (tied/shared tensors stored once, restored on load)."""
    tensors, aliases = _dedupe(sd)
    meta = {"aliases": json.dumps(aliases)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(tensors, str(path), metadata=meta)


def load_weights(path: str | os.PathLike) -> dict:
    """Inverse of :func:`save_weights`."""
    from safetensors import safe_open

    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for k, src in aliases.items():
        sd[k] = sd[src]
    return sd


def _flatten_optim(osd: dict):
    tensors, scalars = {}, {}
    for pkey, st in osd["state"].items():
        for name, v in st.items():
            flat = f"state|{pkey}|{name}"
            if isinstance(v, torch.Tensor):
                tensors[flat] = v.detach().cpu().contiguous()
            else:
                scalars[flat] = v
    return tensors, {"param_groups": json.dumps(osd["param_groups"]), "scalars": json.dumps(scalars),
                     "fresh": "1" if osd.get("fresh") else "0"}


def _unflatten_optim(tensors: dict, meta: dict, key_type) -> dict:
    state: dict = {}
    items = list(tensors.items()) + list(json.loads(meta["scalars"]).items())
    for flat, v in items:
        _, pkey, name = flat.split("|", 2)
        state.setdefault(key_type(pkey), {})[name] = v
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}  # betas
              for g in json.loads(meta["param_groups"])]
    return {"state": state, "param_groups": groups}


def _optim_state(model, optimizer, info: DistInfo) -> dict:
    if not optimizer.state:  # a fresh optimizer (checkpoint 0): nothing to gather
        return {"state": {}, "param_groups": [], "fresh": True}
    if info.enabled:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        reshard(model)
        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    return optimizer.state_dict()


def _rng_state() -> tuple:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": json.dumps([py[0], list(py[1]), py[2]]),
            "numpy": json.dumps([npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])])}
    return tensors, meta


def _set_rng_state(path: Path) -> None:
    from safetensors import safe_open

    t = load_file(str(path))
    torch.set_rng_state(t["torch_cpu"])
    if "torch_cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["torch_cuda"])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "python" in meta:
        v, st, g = json.loads(meta["python"])
        random.setstate((v, tuple(st), g))
    if "numpy" in meta:
        a, keys, pos, has_g, g = json.loads(meta["numpy"])
        np.random.set_state((a, np.asarray(keys, dtype=np.uint32), pos, has_g, g))


def _check_finite(sd: dict) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(f"model parameters {bad[:3]}{'...' if len(bad) > 3 else ''} hold NaN/inf; "
                                    f"no checkpoint written (the previous one is kept)")


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a checkpoint directory (step, data position, ...)."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The directory named by ``<output_dir>/checkpoints/latest``, or ``None``."""
    root = Path(output_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    p = root / ptr.read_text().strip()
    return p if (p / "trainer_state.json").is_file() else None


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    info: DistInfo, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring); return its directory.

    Raises :class:`NonFiniteWeightsError` (writing nothing) when a parameter is NaN/inf.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    msd = model_state_dict(model, info)
    osd = _optim_state(model, optimizer, info)
    if info.main:
        _check_finite(msd)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(info)
    rng_t, rng_m = _rng_state()
    save_file(rng_t, str(tmp / f"rng_rank{info.rank}.safetensors"), metadata=rng_m)
    if info.main:
        save_weights(msd, tmp / "model.safetensors")
        ot, om = _flatten_optim(osd)
        save_file(ot, str(tmp / "optimizer.safetensors"), metadata=om)
        state = dict(trainer_state, step=step, world_size=info.world_size)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
    barrier(info)
    if info.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = root / "latest.tmp"
        ptr_tmp.write_text(final.name)
        os.replace(ptr_tmp, root / "latest")
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; return the trainer state."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != info.world_size:
        raise ValueError(f"checkpoint {path} was written with world_size={state.get('world_size')} but this run has "
                         f"world_size={info.world_size}; resume with the same number of processes")
    msd = load_weights(path / "model.safetensors")
    from safetensors import safe_open

    ot = load_file(str(path / "optimizer.safetensors"))
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        om = f.metadata()
    fresh = om.get("fresh") == "1"  # saved before the first optimizer step: keep the new optimizer as is
    if info.enabled:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        reshard(model)
        set_model_state_dict(model, msd, options=_full_options(cpu_offload=False))
        if not fresh:
            osd = _unflatten_optim(ot, om, str)
            set_optimizer_state_dict(model, optimizer, osd, options=_full_options(cpu_offload=False))
    else:
        model.load_state_dict(msd)
        if not fresh:
            optimizer.load_state_dict(_unflatten_optim(ot, om, int))
    rng = path / f"rng_rank{info.rank}.safetensors"
    if rng.is_file():
        _set_rng_state(rng)
    return state
