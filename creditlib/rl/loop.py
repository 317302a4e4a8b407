"""Run-loop helpers of the recipes: where a run starts, signals, the learning-rate schedule, stops and the summary.

The recipes keep the algorithm in view (setup -> train -> step); what every run needs around it
lives here:

* :func:`run_folder` -- the run's folder: a new ``runs/<credit>-<task>-<YYYYmmdd-HHMMSS>`` for every
  run unless ``--output-dir`` names one;
* :func:`start_point` -- ``--resume`` (the newest intact checkpoint, via
  :func:`creditlib.rl.checkpoint.resolve_resume`: a damaged run is never restarted from scratch),
  ``--init-from`` (another run's weights) or a fresh start; a folder holding another run is
  refused unless ``--resume`` or ``--overwrite`` (:func:`clear_run_folder`);
* :func:`choose_threads` -- torch's CPU thread counts from the model's size and the machine;
* :class:`StopSignals` -- SIGTERM / SIGINT finish the current step, checkpoint and exit ``128 + signal``;
* :func:`learning_rate` -- linear warm-up of the RL learning rate;
* :func:`nonfinite_message` -- the message of a NaN/inf stop (the last good checkpoint, how to resume);
* :func:`write_summary` -- final model, plot and the summary table.

The recipes themselves are scripts, not part of the library: presets are YAML configs
(``recipes/grpo.py --config recipes/configs/NAME.yaml``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .distributed import all_reduce_sum
from .metrics import plot_metrics, read_metrics, summary_table

__all__ = ["StartPoint", "start_point", "init_weights", "StopSignals", "learning_rate", "nonfinite_message",
           "write_summary", "run_folder", "RUN_ARTEFACTS", "run_artefacts", "clear_run_folder",
           "read_run_info", "write_run_info", "choose_threads", "set_threads", "TINY_MODEL_PARAMS"]

#: What a run writes into its folder. ``--overwrite`` deletes exactly these (nothing else); a folder
#: holding any of them holds a run, and a new run there is refused without ``--resume`` / ``--overwrite``.
RUN_ARTEFACTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "metrics.png", "reference.safetensors",
                 "tensorboard", "wandb", "run.json")



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


# ------------------------------------------------------------------------------------ the run folder
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "run"


def _task_name(dataset: str) -> str:
    """``gsm8k`` for a registered name, the file's stem for a local file (``data/train.jsonl`` -> ``train``)."""
    p = Path(dataset)
    return _slug(p.stem if p.suffix or len(p.parts) > 1 else dataset)


def _claim(root: Path, base: str) -> Path:
    """Create and return ``root/base`` (``root/base-2``, ``-3``, ... when taken: runs started in the same
    second); ``mkdir`` without ``exist_ok`` makes the claim atomic between processes."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = root / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name {root / base}-N")  # pragma: no cover


def run_folder(cfg, info=None, root: str | os.PathLike = "runs", now: Optional[float] = None) -> Tuple[Path, bool]:
    """``(folder, created)``: ``--output-dir`` as given (``created = False``), or a new folder
    ``<root>/<credit>-<task>-<YYYYmmdd-HHMMSS>`` (like TRL / HF run names), created here.

    Under torchrun rank 0 creates it and every rank gets its name (a collective: call it on every rank).
    """
    if cfg.output_dir:
        return Path(cfg.output_dir), False
    name = [None]
    if info is None or info.main:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        task = getattr(cfg, "env", "") or cfg.dataset  # --env NAME: the environment is the task
        name[0] = str(_claim(Path(root), f"{_slug(cfg.credit)}-{_task_name(task)}-{stamp}"))
    if info is not None and info.enabled:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(name[0]), True


def run_artefacts(out: str | os.PathLike) -> List[str]:
    """The names of :data:`RUN_ARTEFACTS` present in ``out`` (empty: no run there)."""
    out = Path(out)
    return [n for n in RUN_ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]


def clear_run_folder(out: str | os.PathLike) -> List[str]:
    """``--overwrite``: delete the previous run's files in ``out`` (:data:`RUN_ARTEFACTS`, nothing
    else: a launcher's log beside them stays); return the names deleted."""
    gone = run_artefacts(out)
    for n in gone:
        p = Path(out) / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone


def read_run_info(out: str | os.PathLike) -> dict:
    """``<out>/run.json`` (what a resumed run must reuse, e.g. the W&B run id), ``{}`` when absent."""
    p = Path(out) / "run.json"
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p} is unreadable ({type(e).__name__}: {e}); delete it to start a new W&B run") from None
    return info if isinstance(info, dict) else {}


def write_run_info(out: str | os.PathLike, **fields) -> None:
    """Merge ``fields`` into ``<out>/run.json`` (written atomically)."""
    p = Path(out) / "run.json"
    info = dict(read_run_info(out), **fields)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, p)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def start_point(cfg, say: Callable[[str], None]) -> StartPoint:
    """Decide where the run starts, before anything is written to ``cfg.output_dir``.

    ``--resume``: the newest intact checkpoint of ``cfg.output_dir`` (a damaged newest one is named
    and skipped; :class:`~creditlib.rl.checkpoint.CheckpointError` when checkpoints exist but none
    is intact -- never a silent fresh start over them; also when ``--kl-coef > 0`` and the run has
    no ``reference.safetensors``). No checkpoint at all: a fresh start, said so.
    ``--init-from PATH``: a checkpoint directory, or a run directory (its newest intact checkpoint);
    ``ValueError`` when it lies inside ``cfg.output_dir``.
    Otherwise (a fresh start or ``--init-from``) ``ValueError`` when ``cfg.output_dir`` holds a run
    (:func:`run_artefacts`) and ``cfg.overwrite`` is off: nothing of a previous run is ever lost.
    """
    out = Path(cfg.output_dir)
    if cfg.resume:
        path = ckpt.resolve_resume(out, warn=say)
        if path is None:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
            return StartPoint("fresh", None, {})
        if cfg.kl_coef > 0 and not (out / "reference.safetensors").is_file():
            raise ckpt.CheckpointError(
                f"--resume --kl-coef {cfg.kl_coef:g}: {out / 'reference.safetensors'} is missing: this run was "
                f"trained without a KL term (--kl-coef 0), so it kept no reference policy. Resume with --kl-coef 0, "
                f"or start a new run with --init-from {path} --kl-coef {cfg.kl_coef:g} (its weights become the reference)")
        return StartPoint("resume", path, ckpt.read_trainer_state(path))
    if cfg.init_from and _inside(Path(cfg.init_from), out):
        raise ValueError(f"--init-from {cfg.init_from} lies inside --output-dir {out}: a new run there would replace "
                         f"the checkpoint it starts from. Use another --output-dir (or none: a new folder per run)")
    held = run_artefacts(out)
    if held and not cfg.overwrite:
        raise ValueError(f"--output-dir {out} holds another run ({', '.join(held)}). Nothing was changed. Continue it "
                         f"with --resume, delete that run's files with --overwrite, or pick another --output-dir "
                         f"(without one, every run gets a new folder under runs/)")
    if cfg.init_from:
        path = _find_checkpoint(Path(cfg.init_from), say)
        return StartPoint("init", path, ckpt.read_trainer_state(path))
    return StartPoint("fresh", None, {})


def init_weights(start: StartPoint, model) -> None:
    """Load an ``--init-from`` checkpoint's full state dict into ``model`` (before sharding).

    Raises :class:`~creditlib.rl.checkpoint.CheckpointError` naming the checkpoint when its weights
    do not fit the model (another model size or architecture).
    """
    f = start.path / "model.safetensors"
    sd = ckpt.load_weights(f)
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in sd.items()})
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"--init-from {start.path}: {f} does not fit this run's model (a checkpoint of another model size or "
            f"architecture? pass the --model / --hidden-size / --num-layers / --num-heads / --intermediate-size of "
            f"the run that wrote it): {str(e)[:400]}") from None


# ------------------------------------------------------------------------------------ threads
#: Below this many parameters a model runs on one CPU thread (see :func:`choose_threads`).
TINY_MODEL_PARAMS = 20_000_000


def choose_threads(n_params: int, requested: int = 0, local_world_size: int = 1,
                   load: Optional[float] = None) -> Tuple[int, str]:
    """``(threads, why)``: torch's intra-op CPU thread count for a model of ``n_params`` parameters.

    ``requested > 0`` (``--num-threads N``) wins; then ``OMP_NUM_THREADS`` when set; then the rule:
    a model under :data:`TINY_MODEL_PARAMS` gets 1 thread (its matmuls are too small to split: the
    threads mostly synchronise, and on a busy machine each one waits for a core -- the embedded
    recipe ran about 20x slower with 2 threads than with 1 at load 2-3); a larger one the cores
    this process may run on (``os.sched_getaffinity``), shared among the processes of this node,
    less the cores other work keeps busy (``load``: the 1-minute load average, read with
    ``os.getloadavg`` when None): a thread that has to wait for a busy core stalls every other
    thread at the next barrier, so on a machine already loaded to its core count one thread is
    faster than several.
    """
    if not isinstance(requested, int) or requested < 0:
        raise ValueError(f"num_threads must be an integer >= 0 (0 = auto), got {requested!r}")
    if requested:
        return requested, f"--num-threads {requested}"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_params < TINY_MODEL_PARAMS:
        return 1, f"auto: a small model, {n_params:,} parameters < {TINY_MODEL_PARAMS // 10**6}M"
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    lws = max(1, local_world_size)
    free = max(1, int(cores - load + 0.5))  # cores not kept busy by other work (1 at least)
    n = max(1, min(cores, free) // lws)
    share = f" / {lws} processes" if lws > 1 else ""
    busy = f", load {load:.1f} leaves {free} free" if free < cores else ""
    return n, f"auto: {n_params:,} parameters, the {cores} cores this process may use{busy}{share}"


def set_threads(threads: int) -> str:
    """Apply ``threads`` to torch; one inter-op thread (the recipe runs no inter-op parallel work:
    no ``torch.jit.fork``; a pool of them would only compete for cores). Returns what was set."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
        inter = "1 inter-op thread"
    except RuntimeError:  # settable once per process, before any inter-op work (a second run in one process)
        inter = f"{torch.get_num_interop_threads()} inter-op threads (already fixed in this process)"
    return f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}, {inter}"


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
    png = plot_metrics(out / "metrics.jsonl", out / "metrics.png", f"{name} (--credit {cfg.credit}) on {getattr(cfg, 'env', '') or cfg.dataset}") if cfg.plot else None
    first, last = rl[:10], rl[-10:]
    before = state.get("acc_before")
    init = state.get("acc_init")
    warm = (f"{state['sft_steps']} warm-up steps" if state.get("init_from") is None
            else "--init-from")
    rows: List[Tuple[str, object]] = [
        ("held-out accuracy, initial model", "-" if init is None else f"{init:.3f}"),
        (f"held-out accuracy, before RL ({warm})", f"{before:.3f}"),
        (f"held-out accuracy, after {step} RL steps", f"{acc['accuracy']:.3f}"),
    ]
    if state.get("init_from") is not None:
        rows.append(("initialised from", state["init_from"]))
    if acc.get("sampled_accuracy") is not None:
        rows.append((f"sampled accuracy ({cfg.eval_samples}/prompt, T={cfg.temperature:g}), before/after",
                     f"{state.get('sampled_before', float('nan')):.3f} / {acc['sampled_accuracy']:.3f}"))
    rows += [
        (f"train reward, first {len(first)} / last {len(last)} RL steps",
         f"{_mean(first, 'reward'):.3f} / {_mean(last, 'reward'):.3f}"),
        ("held-out prompts (greedy decoding)", heldout_size),
        ("reward failures (errors / timeouts)", f"{reward.total_errors} / {reward.total_timeouts}"),
        ("wall time: warm-up / RL / total", f"{state.get('sft_seconds', 0.0):.0f} s / {time.time() - t_rl:.0f} s / "
                                            f"{time.time() - t_start:.0f} s (this process)"),
        *extra_rows,
        ("run folder", str(out)),
        ("metrics, samples", "metrics.jsonl, samples.jsonl"),
        ("plot", png.name if png else "(--no-plot)"),
        ("last checkpoint", _relative(ckpt.latest_checkpoint(out), out)),
        ("final model", _relative(final, out)),
    ]
    return summary_table(rows, (f"{name} summary: --credit {cfg.credit}", "")), png


def _relative(path: Optional[Path], root: Path) -> str:
    if path is None:
        return "-"
    try:
        return str(Path(path).relative_to(root)) + ("/" if Path(path).is_dir() else "")
    except ValueError:
        return str(path)
