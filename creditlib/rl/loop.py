"""Run-loop helpers of the recipes: where a run starts, signals, the learning-rate schedule, stops and the summary.

The recipes keep the algorithm in view (setup -> train -> step); what every run needs around it
lives here:

* :func:`start_point` -- ``--resume`` (the newest intact checkpoint, via
  :func:`creditlib.rl.checkpoint.resolve_resume`: a damaged run is never restarted from scratch),
  ``--init-from`` (another run's weights) or a fresh start;
* :class:`StopSignals` -- SIGTERM / SIGINT finish the current step, checkpoint and exit ``128 + signal``;
* :func:`learning_rate` -- linear warm-up of the RL learning rate;
* :func:`nonfinite_message` -- the message of a NaN/inf stop (the last good checkpoint, how to resume);
* :func:`write_summary` -- final model, plot and the summary table;
* :func:`load_recipe` -- a recipe script as a module (the presets and the benchmarks load
  ``recipes/grpo.py`` this way, without putting ``recipes/`` on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from types import ModuleType
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .distributed import all_reduce_sum
from .metrics import plot_metrics, read_metrics, summary_table

__all__ = ["StartPoint", "start_point", "init_weights", "StopSignals", "learning_rate", "nonfinite_message",
           "write_summary", "load_recipe"]


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts.

    ``kind``: ``"fresh"`` (warm-up, then RL from step 0), ``"resume"`` (this run's checkpoint
    ``path``: model, optimizer, RNG, step, data position) or ``"init"`` (weights of another run's
    checkpoint ``path``; fresh optimizer, RL step 0, the checkpoint's data position).
    ``state``: the checkpoint's trainer state (``{}`` for a fresh start).
    """

    kind: str
    path: Optional[Path] = None
    state: Optional[dict] = None

    @property
    def resume_step(self) -> Optional[int]:
        """RL step to truncate ``metrics.jsonl`` to (``None``: a new file)."""
        return self.state["step"] if self.kind == "resume" else None


def _find_checkpoint(path: Path, say: Callable[[str], None]) -> Path:
    """A checkpoint directory from ``path``: itself, or the newest intact checkpoint of a run directory."""
    if (path / "model.safetensors").is_file() and (path / "trainer_state.json").is_file():
        ckpt.check_checkpoint(path)
        return path
    if (path / "checkpoints").is_dir():
        found = ckpt.resolve_resume(path, warn=say)
        if found is not None:
            return found
    raise ValueError(f"--init-from {path}: not a checkpoint (a checkpoints/step_N directory holding model.safetensors "
                     f"and trainer_state.json) nor a run directory with an intact checkpoint")


def start_point(cfg, say: Callable[[str], None]) -> StartPoint:
    """Decide where the run starts, before anything is written to ``cfg.output_dir``.

    ``--resume``: the newest intact checkpoint of ``cfg.output_dir`` (a damaged newest one is named
    and skipped; :class:`~creditlib.rl.checkpoint.CheckpointError` when checkpoints exist but none
    is intact -- never a silent fresh start over them). No checkpoint at all: a fresh start, said so.
    ``--init-from PATH``: a checkpoint directory, or a run directory (its newest intact checkpoint).
    """
    out = Path(cfg.output_dir)
    if cfg.resume:
        path = ckpt.resolve_resume(out, warn=say)
        if path is None:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
            return StartPoint("fresh", None, {})
        return StartPoint("resume", path, ckpt.read_trainer_state(path))
    if cfg.init_from:
        path = _find_checkpoint(Path(cfg.init_from), say)
        return StartPoint("init", path, ckpt.read_trainer_state(path))
    return StartPoint("fresh", None, {})


def init_weights(start: StartPoint) -> dict:
    """The full model state dict of an ``--init-from`` checkpoint (load it before sharding)."""
    return ckpt.load_weights(start.path / "model.safetensors")


class StopSignals:
    """Context manager: SIGTERM and SIGINT set :attr:`signal` instead of killing the process.

    The loop finishes its step, checkpoints and exits with ``128 + signal`` (see the recipes). The
    previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: Optional[int] = None
        self._old: Dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.signal = signum

    @property
    def requested(self) -> bool:
        """A signal reached this process."""
        return self.signal is not None

    def any_rank(self, info) -> bool:
        """A signal reached some rank (a collective under torchrun: every rank must call it at the same
        point, and every rank gets the same answer, so they stop after the same step)."""
        if not info.enabled:
            return self.requested
        return float(all_reduce_sum(torch.tensor([1.0 if self.requested else 0.0]), info)) > 0

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def learning_rate(cfg, step: int) -> float:
    """RL learning rate at RL step ``step`` (1-based): linear warm-up over ``cfg.warmup_steps``, then ``cfg.lr``."""
    return cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def nonfinite_message(name: str, step: int, error: Exception, last: Optional[Path], last_saved: int) -> str:
    return (f"\n{name}: stopped at RL step {step}: {error}.\nThe last good checkpoint is {last} (RL step "
            f"{last_saved}); nothing was written after it. Resume with --resume (e.g. with a lower --lr).")


def _mean(recs: Sequence[dict], key: str) -> float:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return sum(vals) / max(1, len(vals))


def write_summary(name: str, cfg, out: Path, model, tokenizer, full_state_dict: dict, state: dict, acc: Dict,
                  step: int, reward, t_start: float, t_rl: float, heldout_size: int,
                  extra_rows: Sequence[Tuple[str, object]] = ()) -> Tuple[str, Optional[Path]]:
    """Save ``final/`` (``save_pretrained`` + tokenizer), the plot, and return ``(table, png)``.

    ``acc``: the last evaluation (``{"accuracy", "sampled_accuracy"}``). Call on the main rank only.
    """
    final = out / "final"
    inner = getattr(model, "module", model)
    inner.save_pretrained(final, state_dict=full_state_dict)
    tokenizer.save_pretrained(final)
    recs = read_metrics(out / "metrics.jsonl")
    rl = [r for r in recs if r.get("phase") == "rl"]
    png = plot_metrics(out / "metrics.jsonl", out / "metrics.png", f"{name} (--credit {cfg.credit}) on {cfg.dataset}") if cfg.plot else None
    first, last = rl[:10], rl[-10:]
    before = state.get("acc_before")
    init = state.get("acc_init")
    warm = (f"after {state['sft_steps']} warm-up steps" if state.get("init_from") is None
            else f"initialised from {state['init_from']}")
    rows: List[Tuple[str, object]] = [
        ("held-out accuracy, initial model", "-" if init is None else f"{init:.3f}"),
        (f"held-out accuracy, before RL ({warm})", f"{before:.3f}"),
        (f"held-out accuracy, after {step} RL steps", f"{acc['accuracy']:.3f}"),
    ]
    if acc.get("sampled_accuracy") is not None:
        rows.append((f"sampled accuracy ({cfg.eval_samples} per prompt, T={cfg.temperature:g}), before / after",
                     f"{state.get('sampled_before', float('nan')):.3f} / {acc['sampled_accuracy']:.3f}"))
    rows += [
        (f"train reward, first {len(first)} / last {len(last)} RL steps",
         f"{_mean(first, 'reward'):.3f} / {_mean(last, 'reward'):.3f}"),
        ("held-out prompts (greedy decoding)", heldout_size),
        ("reward failures (errors / timeouts)", f"{reward.total_errors} / {reward.total_timeouts}"),
        ("wall time: warm-up / RL / total", f"{state.get('sft_seconds', 0.0):.0f} s / {time.time() - t_rl:.0f} s / "
                                            f"{time.time() - t_start:.0f} s (this process)"),
        *extra_rows,
        ("metrics / samples", f"{out / 'metrics.jsonl'} / {out / 'samples.jsonl'}"),
        ("plot", png or "(--no-plot)"),
        ("checkpoint / final model", f"{ckpt.latest_checkpoint(out)} / {final}"),
    ]
    return summary_table(rows, (f"{name} summary", "")), png


def load_recipe(path: str | os.PathLike) -> ModuleType:
    """The recipe script at ``path`` (e.g. ``recipes/grpo.py``) as a module, executed once per process.

    Registered in ``sys.modules`` as ``creditlib_recipes_<stem>``, so every preset that loads the same
    file shares one module.
    """
    path = Path(path).resolve()
    name = f"creditlib_recipes_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"path must be a Python recipe file, got {str(path)!r}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
