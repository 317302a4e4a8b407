"""Run logging: ``metrics.jsonl`` (one JSON object per line), a PNG plot and the final summary table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "summary_table"]


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

    def __init__(self, path: str | os.PathLike, resume_step: Optional[int] = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
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
    """Reward (per step and a moving average) and held-out accuracy against RL step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(path)
    rl = [r for r in recs if r.get("phase") == "rl"]
    ev = [r for r in recs if r.get("phase") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
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
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def summary_table(rows: Sequence[Sequence], headers: Sequence[str] = ("", "value")) -> str:
    """A plain-text table (no extra dependency)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line, fmt(cells[0]), line] + [fmt(r) for r in cells[1:]] + [line])
