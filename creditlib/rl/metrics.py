"""Run logging: ``metrics.jsonl`` (one JSON object per line), a PNG plot and the final summary table.

``--report-to tensorboard|wandb`` mirrors every numeric field of every record to TensorBoard
(``<output_dir>/tensorboard``, via ``torch.utils.tensorboard``, which needs the ``tensorboard``
package) or Weights & Biases (``wandb``; ``WANDB_MODE=offline`` writes a local run directory). Both
are imported only when asked for; tags are ``<phase>/<field>`` (``rl/reward``, ``eval/accuracy``,
``sft/loss``) against that phase's step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "summary_table", "make_reporter", "TensorBoardReporter",
           "WandbReporter", "REPORTERS"]

REPORTERS = ("none", "tensorboard", "wandb")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsLogger:
    """Append-only ``metrics.jsonl``. Records carry ``phase`` (``"sft"``, ``"rl"``, ``"eval"``) and ``step``.

    On resume from RL step ``s`` the file is rewritten keeping the warm-up records and the RL/eval
    records with ``step <= s``, so the file of a resumed run matches an uninterrupted one.
    """

    def __init__(self, path: str | os.PathLike, resume_step: Optional[int] = None, enabled: bool = True,
                 reporter=None):
        self.path, self.enabled, self.reporter = Path(path), enabled, reporter
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("phase") == "sft" or r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self.reporter is not None:
            self.reporter.log(rec)

    def close(self) -> None:
        if self.enabled and self.reporter is not None:
            self.reporter.close()
            self.reporter = None


def _scalars(record: Dict):
    """``(phase, step, {field: float})`` of a record's numeric fields."""
    phase, step = str(record.get("phase", "run")), int(record.get("step") or 0)
    vals = {k: float(v) for k, v in record.items()
            if k not in ("phase", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return phase, step, vals


class TensorBoardReporter:
    """Scalars to TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``; needs ``tensorboard``).

    The warm-up (``phase == "sft"``) has its own step axis, so it is written to its own TensorBoard
    run, ``log_dir/sft``: ``purge_step`` (a resumed run dropping the RL / eval events after its
    checkpoint) then cannot remove warm-up points, which a resumed run does not log again.
    """

    def __init__(self, log_dir: str | os.PathLike, config: Optional[Dict] = None, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--report-to tensorboard needs the tensorboard package: pip install 'creditlib[tensorboard]' "
                              "(or use --report-to none)") from e
        self._writer_cls, self.log_dir = SummaryWriter, Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.sft_writer = None  # opened on the first warm-up record (never purged)
        if config:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, record: Dict) -> None:
        phase, step, vals = _scalars(record)
        if phase == "sft" and self.sft_writer is None:
            self.sft_writer = self._writer_cls(log_dir=str(self.log_dir / "sft"))
        writer = self.sft_writer if phase == "sft" else self.writer
        for k, v in vals.items():
            if math.isfinite(v):
                writer.add_scalar(f"{phase}/{k}", v, step)
        writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.sft_writer is not None:
            self.sft_writer.close()


class WandbReporter:
    """Scalars to Weights & Biases (``wandb.init(dir=output_dir)``; set ``WANDB_MODE=offline`` to stay local).

    ``run_id``: continue that W&B run (a resumed recipe run passes the id its first run stored in
    ``run.json``), so one run keeps one history; ``None`` starts a new run. :attr:`run_id` is the id used.
    """

    def __init__(self, out_dir: str | os.PathLike, config: Optional[Dict] = None, name: Optional[str] = None,
                 run_id: Optional[str] = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--report-to wandb needs the wandb package: pip install 'creditlib[wandb]' (WANDB_MODE=offline "
                              "logs without an account), or use --report-to none") from e
        self.wandb = wandb
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "creditlib"), name=name, dir=str(out_dir),
                              config=config or {}, id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id
        self._phases: set = set()

    def log(self, record: Dict) -> None:
        phase, step, vals = _scalars(record)
        if phase not in self._phases:  # each phase has its own step axis (warm-up and RL steps both start at 1)
            self._phases.add(phase)
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in vals.items()}})

    def close(self) -> None:
        self.run.finish()


def make_reporter(kind: str, out_dir: str | os.PathLike, config: Optional[Dict] = None, name: Optional[str] = None,
                  resume_step: Optional[int] = None, run_id: Optional[str] = None):
    """The ``--report-to`` sink: ``None`` for ``"none"``, else a reporter with ``log(record)`` / ``close()``.

    ``resume_step``: the RL step a resumed run continues from (TensorBoard drops its later RL / eval
    events); ``run_id``: the W&B run to continue.
    """
    if kind not in REPORTERS:
        raise ValueError(f"report_to must be one of {REPORTERS}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "tensorboard":
        # purge_step: a resumed run drops the events logged after its checkpoint, like metrics.jsonl
        return TensorBoardReporter(Path(out_dir) / "tensorboard", config,
                                   purge_step=None if resume_step is None else resume_step + 1)
    return WandbReporter(out_dir, config, name, run_id=run_id)


def read_metrics(path: str | os.PathLike) -> List[Dict]:
    """All records of a ``metrics.jsonl`` (a truncated last line, from a killed run, is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(path: str | os.PathLike, png: str | os.PathLike, title: str = "") -> Path:
    """Reward (per step and a moving average) and held-out accuracy against RL step, as a PNG; beside
    it, when the evaluations carry ``generated_tokens`` (the RL rollouts' tokens so far), the same
    accuracy against generated tokens (so a tree run and a flat run compare at equal sampling cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(path)
    rl = [r for r in recs if r.get("phase") == "rl"]
    ev = [r for r in recs if r.get("phase") == "eval"]
    by_tokens = [r for r in ev if r.get("generated_tokens") is not None]
    by_tokens = by_tokens if any(r["generated_tokens"] > 0 for r in by_tokens) else []
    fig, axes = plt.subplots(1, 2 if by_tokens else 1, figsize=(12 if by_tokens else 7, 4), squeeze=False)
    ax = axes[0][0]
    if rl:
        xs = [r["step"] for r in rl]
        ys = [r.get("reward", float("nan")) for r in rl]
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=1, label="train reward (per step)")
        k = max(1, len(ys) // 10)
        ma = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, ma, color="tab:blue", lw=2, label=f"train reward ({k}-step mean)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-", color="tab:red", lw=2,
                label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward / accuracy")
    if by_tokens:
        ax2 = axes[0][1]
        ax2.plot([r["generated_tokens"] for r in by_tokens], [r["accuracy"] for r in by_tokens], "o-",
                 color="tab:red", lw=2, label="held-out accuracy (greedy)")
        ax2.set_xlabel("generated tokens (RL rollouts, cumulative)")
        ax2.set_ylabel("accuracy")
        ax2.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    for a in axes[0]:
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
        a.legend(loc="lower right")
    if title:
        (fig.suptitle if by_tokens else ax.set_title)(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def summary_table(rows: Sequence[Sequence], headers: Sequence[str] = ("", "value"), width: int = 100) -> str:
    """A plain-text table (no extra dependency) at most ``width`` columns wide: long cells wrap
    (paths break anywhere), the last column takes what the others leave."""
    import textwrap

    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    n = len(headers)
    widths = [max(len(r[i]) for r in cells) for i in range(n)]
    room = width - (3 * n + 1)  # borders and padding
    if sum(widths) > room:
        widths[:-1] = [min(w, max(12, (room * 11) // (20 * (n - 1) or 1))) for w in widths[:-1]]
        widths[-1] = max(12, room - sum(widths[:-1]))
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(r):
        parts = [textwrap.wrap(c, w, break_long_words=True, break_on_hyphens=False) or [""] for c, w in zip(r, widths)]
        return "\n".join("| " + " | ".join((p[i] if i < len(p) else "").ljust(w) for p, w in zip(parts, widths)) + " |"
                         for i in range(max(len(p) for p in parts)))

    return "\n".join([line, fmt(cells[0]), line] + [fmt(r) for r in cells[1:]] + [line])
