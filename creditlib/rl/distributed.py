"""Data-parallel helpers: torchrun initialisation, FSDP2 sharding, reductions, a clean exit.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank samples its own prompts, computes its own loss,
and FSDP2 (``torch.distributed.fsdp.fully_shard``) averages the gradients. CUDA uses NCCL, CPU
uses gloo. Single-process runs skip all of it (every helper is then a no-op).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shard_model", "reshard", "all_reduce_sum", "all_reduce_dict_mean", "barrier",
           "finish", "is_main"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group from torchrun's environment (``nccl`` on CUDA, ``gloo`` on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    _thread_lock_for_tqdm()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world, local)


def _thread_lock_for_tqdm() -> None:
    """Give tqdm (the recipe's bars, and transformers' / huggingface_hub's) a threading lock.

    tqdm's default write lock also creates a ``multiprocessing.RLock``, a named POSIX semaphore
    registered with multiprocessing's resource tracker, to serialise bars across *forked*
    children. torchrun's ranks are not forked from each other, so that lock serves nothing here;
    and :func:`finish` ends each rank with ``os._exit`` (which skips the semaphore's finalizer), so
    the tracker printed "There appear to be 1 leaked semaphore objects" at every exit. With a plain
    threading lock no semaphore is ever created.
    """
    import threading

    from tqdm import tqdm

    if not hasattr(tqdm, "_lock"):  # a lock a caller set up on purpose is kept
        tqdm.set_lock(threading.RLock())


def _layer_classes(model) -> set:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names or type(m).__name__.endswith("DecoderLayer")}


def shard_model(model: torch.nn.Module, info: DistInfo, mp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, norm, head).

    ``mp_dtype``: optional mixed-precision parameter dtype (e.g. bfloat16 on GPU; gradients are
    reduced in float32).
    """
    if not info.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if mp_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    classes = tuple(_layer_classes(model))
    if classes:
        for m in list(model.modules()):
            if isinstance(m, classes):
                fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state.

    A forward pass without backward (generation, evaluation) leaves the root module's parameters
    unsharded; the optimizer and the state-dict APIs expect the sharded parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (a copy; ``t`` itself is not modified)."""
    t = t.detach().clone()
    if info.enabled:
        dev = t.device
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.to(dev)
    return t


def all_reduce_dict_mean(d: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    """Mean over ranks of a dict of floats (same keys on every rank)."""
    if not info.enabled or not d:
        return d
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)  # [K]
    t = all_reduce_sum(t, info) / info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def is_main(info: DistInfo) -> bool:
    return info.rank == 0


def finish(info: DistInfo, code: int = 0) -> None:
    """Tear down the process group. Under torchrun, exit with ``os._exit`` right after
    ``destroy_process_group``: about 1 run in 8 aborted at interpreter exit otherwise (PERF_NOTES)."""
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
