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

A ``step_N`` that is a symbolic link is refused outright (:class:`CheckpointError`). Damage (a
missing or truncated file, a dangling ``latest``, a ``latest`` naming something outside
``checkpoints/``) is detected without loading the tensors (:func:`check_checkpoint` reads the
safetensors headers and compares them with the file sizes). :func:`resolve_resume` is what a
``--resume`` calls: the checkpoint named by ``latest`` when it is intact; else the newest intact
one, with a warning naming the damaged one; else a :class:`CheckpointError` naming the damage. It
returns ``None`` only when there is no checkpoint at all, so a damaged run is never silently
restarted from scratch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import DistInfo, barrier, reshard

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume", "check_checkpoint",
           "intact_checkpoints", "read_trainer_state", "save_weights", "load_weights", "model_state_dict",
           "NonFiniteWeightsError", "CheckpointError"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN/inf parameters: no checkpoint is written."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or unreadable; the message names the file."""


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


def _check_safetensors(f: Path) -> None:
    """Raise :class:`CheckpointError` unless ``f`` is a complete safetensors file (header vs size)."""
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f} is truncated ({size} bytes, no safetensors header)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{f} is truncated ({size} bytes; its header alone needs {n + 8})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # (CheckpointError, a RuntimeError, passes through)
        raise CheckpointError(f"{f} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f} has a malformed safetensors header")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{f} has a malformed safetensors header") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{f} is truncated or damaged ({size} bytes; its header says {8 + n + end})")


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Check that checkpoint directory ``path`` is complete; return its trainer state.

    Reads ``trainer_state.json`` and the safetensors headers (not the tensors) and compares each
    file's size with its header, so a missing, truncated or garbled file is found in milliseconds.
    Raises :class:`CheckpointError` naming the first bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is missing (not a directory)")
    ts = path / "trainer_state.json"
    try:
        state = json.loads(ts.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ts} is missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ts} is truncated or unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{ts} does not hold a trainer state with an integer 'step'")
    _check_safetensors(path / "model.safetensors")
    _check_safetensors(path / "optimizer.safetensors")
    for rng in sorted(path.glob("rng_rank*.safetensors")):  # optional (a rank without one keeps its RNG)
        _check_safetensors(rng)
    return state


def _step_dirs(root: Path) -> List[Tuple[int, Path]]:
    """``(step, dir)`` of the completed ``step_N`` directories under ``root``, oldest first.

    Raises :class:`CheckpointError` when a ``step_N`` entry is a symbolic link: it would let
    ``--resume`` load another run's checkpoint, and pruning cannot delete what it points to.
    """
    if not root.is_dir():
        return []
    links = sorted(p.name for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_symlink())
    if links:
        raise CheckpointError(f"{root} holds symbolic links named like checkpoints ({', '.join(links)}): a checkpoint "
                              f"folder must be a real directory of this run. Remove the links (or copy the checkpoints "
                              f"in), or start from another run's weights with --init-from")
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out)


def _pointer(root: Path) -> Tuple[Optional[Path], Optional[str]]:
    """The checkpoint ``root/latest`` names: ``(path, None)``, or ``(None, why it is unusable)``,
    or ``(None, None)`` when there is no pointer. A name that is not a plain ``step_N`` inside
    ``root`` (``../x``, an absolute path, a symlink out) is refused."""
    ptr = root / "latest"
    if not ptr.exists() and not ptr.is_symlink():
        return None, None
    try:
        name = ptr.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{ptr} is unreadable ({type(e).__name__})"
    if not _STEP_DIR.match(name):
        return None, f"{ptr} names {name!r}, which is not a step_N directory inside {root}"
    target = root / name
    try:
        inside = target.resolve().parent == root.resolve()
    except OSError:
        inside = False
    if not inside:
        return None, f"{ptr} names {name!r}, which resolves outside {root}"
    return target, None


def intact_checkpoints(output_dir: str | os.PathLike) -> List[Path]:
    """The intact checkpoints of a run (see :func:`check_checkpoint`), newest first."""
    root = Path(output_dir) / "checkpoints"
    out = []
    for _, p in reversed(_step_dirs(root)):
        try:
            check_checkpoint(p)
        except CheckpointError:
            continue
        out.append(p)
    return out


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The directory named by ``<output_dir>/checkpoints/latest``, or ``None`` (no pointer, a pointer
    to something outside ``checkpoints/`` or to a directory without ``trainer_state.json``).
    Does not read the tensors: use :func:`resolve_resume` to pick a checkpoint to resume from."""
    p, _ = _pointer(Path(output_dir) / "checkpoints")
    return p if p is not None and (p / "trainer_state.json").is_file() else None


def resolve_resume(output_dir: str | os.PathLike, *, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The checkpoint a ``--resume`` run should load, checked intact.

    * No checkpoint at all (no ``checkpoints/`` folder, or one holding neither a ``step_N``
      directory nor a ``latest`` pointer): ``None``; starting from scratch is then right.
    * ``latest`` names an intact checkpoint: that one.
    * ``latest`` is dangling, unreadable, points outside ``checkpoints/``, or names a damaged
      checkpoint (missing or truncated file): the newest intact checkpoint, after
      ``warn(message)`` naming what is damaged and what is used (default: ``warnings.warn``).
    * Checkpoints exist but none is intact: :class:`CheckpointError` naming the damage.
    """
    root = Path(output_dir) / "checkpoints"
    steps = _step_dirs(root)
    target, why = _pointer(root)
    if not steps and target is None and why is None:
        return None
    problems: List[str] = []
    if why is not None:
        problems.append(why)
    elif target is None:
        problems.append(f"{root / 'latest'} is missing")
    else:
        try:
            check_checkpoint(target)
            return target
        except CheckpointError as e:
            problems.append(f"checkpoint {target} named by {root / 'latest'} is damaged: {e}")
    for _, p in reversed(steps):
        if p == target:
            continue
        try:
            check_checkpoint(p)
        except CheckpointError as e:
            problems.append(f"checkpoint {p} is damaged: {e}")
            continue
        msg = "; ".join(problems) + f". Resuming from the newest intact checkpoint, {p}."
        (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(msg)
        return p
    raise CheckpointError("cannot resume from " + str(root) + ": " + "; ".join(problems)
                          + ". No intact checkpoint is left; move the folder away (or use another --output-dir) "
                            "to start from scratch.")


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    info: DistInfo, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring); return its directory.

    Raises :class:`NonFiniteWeightsError` (writing nothing) when a parameter is NaN/inf, and
    :class:`CheckpointError` (writing nothing) when ``checkpoints/`` holds a symlinked ``step_N``.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    _step_dirs(root)  # CheckpointError on a symlinked step folder, before anything is written
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
        # Newer step folders belong to a timeline this run replaced (a fresh start in an old
        # folder, or a resume past a damaged checkpoint): remove them, so that neither pruning nor
        # a later --resume can prefer them to this run's own checkpoints. Then keep the newest
        # `keep` of this run (this one included) and drop leftovers of killed saves.
        steps = _step_dirs(root)
        stale = [p for s, p in steps if s > step]
        older = [p for s, p in steps if s < step]
        drop = stale + (older[:len(older) - (keep - 1)] if keep > 0 and len(older) > keep - 1 else [])
        drop += [p for p in root.glob("step_*.tmp") if p.is_dir() and p != tmp]
        for old in drop:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def _newest_intact_note(path: Path) -> str:
    """`` the newest intact checkpoint in <root> is <p>`` (or that there is none), for error messages."""
    root = path.parent
    try:
        good = [p for p in intact_checkpoints(root.parent) if p != path] if root.name == "checkpoints" else []
    except CheckpointError as e:  # symlinked step folders: say that instead
        return f"; {e}"
    if good:
        return f"; the newest intact checkpoint in {root} is {good[0]} (--resume picks it automatically)"
    return f"; there is no intact checkpoint in {root}"


def load_checkpoint(path: str | os.PathLike, model, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; return the trainer state.

    Raises :class:`CheckpointError` naming the bad file and the newest intact checkpoint when a
    file is missing, truncated or does not fit the model / optimizer.
    """
    path = Path(path)
    try:
        state = check_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}{_newest_intact_note(path)}") from None
    if state.get("world_size", 1) != info.world_size:
        raise ValueError(f"checkpoint {path} was written with world_size={state.get('world_size')} but this run has "
                         f"world_size={info.world_size}; resume with the same number of processes")
    from safetensors import safe_open

    current = path / "model.safetensors"
    try:
        msd = load_weights(current)
        current = path / "optimizer.safetensors"
        ot = load_file(str(current))
        with safe_open(str(current), "pt") as f:
            om = f.metadata()
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"cannot load checkpoint {path}: {current} is unreadable ({type(e).__name__}: {e})"
                              f"{_newest_intact_note(path)}") from e
    fresh = om.get("fresh") == "1"  # saved before the first optimizer step: keep the new optimizer as is
    current = path / "model.safetensors"
    try:
        if info.enabled:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            reshard(model)
            set_model_state_dict(model, msd, options=_full_options(cpu_offload=False))
            if not fresh:
                current = path / "optimizer.safetensors"
                osd = _unflatten_optim(ot, om, str)
                set_optimizer_state_dict(model, optimizer, osd, options=_full_options(cpu_offload=False))
        else:
            model.load_state_dict(msd)
            if not fresh:
                current = path / "optimizer.safetensors"
                optimizer.load_state_dict(_unflatten_optim(ot, om, int))
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {current} does not fit this run's "
                              f"{'model' if current.name.startswith('model') else 'optimizer'} (a different "
                              f"model configuration?): {type(e).__name__}: {str(e)[:500]}"
                              f"{_newest_intact_note(path)}") from e
    rng = path / f"rng_rank{info.rank}.safetensors"
    if rng.is_file():
        try:
            _set_rng_state(rng)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise CheckpointError(f"cannot load checkpoint {path}: {rng} is unreadable ({type(e).__name__}: {e})"
                                  f"{_newest_intact_note(path)}") from e
    return state
