"""Statistics of a learning study: many recipe runs (variants x seeds) compared on their curves.

Each run is read from its ``metrics.jsonl`` (:func:`load_run`) into a :class:`RunCurve`: held-out
accuracy at the evaluation steps and the per-step training reward (the mean sampled reward of the
step's fresh prompts). From those:

* :func:`steps_to_threshold` -- first RL step where a curve reaches a threshold (``None`` = never:
  the run is *censored*; summaries then count it at its last step, a lower bound, and say so);
* :func:`seconds_to_step` -- training seconds (sum of ``step_seconds``) up to a step;
* :func:`moving_average` -- trailing mean of the training reward;
* :func:`area_under_curve` -- mean of a curve over the run (trapezoid area / span);
* :func:`is_collapsed` -- the accuracy falls and stays below its start;
* :func:`bootstrap_ci` and :func:`ratio_ci` -- percentile-bootstrap 95% intervals of a mean and of a
  ratio of means (independent resampling of the two groups of seeds);
* :func:`summarize` / :func:`compare` / :func:`markdown_table` -- the study's tables;
* :func:`selection_score` / :func:`choose_lr` / :func:`next_rung` -- the per-method learning-rate
  selection (validation AUC, grid extension at an edge);
* :func:`plot_curves` / :func:`plot_threshold_bars` / :func:`plot_forest` / :func:`plot_lr_sensitivity`
  -- PNG figures (matplotlib, Agg backend).

All of it is plain NumPy over floats; nothing here trains a model. (Study code: it lives next to
the runner, ``benchmarks/learning_study.py``, not in the library.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from creditlib.rl.metrics import read_metrics

__all__ = ["RunCurve", "load_run", "truncate", "moving_average", "steps_to_threshold", "seconds_to_step",
           "area_under_curve", "is_collapsed", "bootstrap_ci", "ratio_ci", "summarize", "compare",
           "markdown_table", "plot_curves", "plot_threshold_bars", "plot_forest", "plot_lr_sensitivity", "fmt_ci",
           "selection_score", "choose_lr", "next_rung", "lr_tag"]


@dataclass
class RunCurve:
    """The curves of one run.

    Attributes:
        eval_steps: ``[E]`` RL steps of the held-out evaluations (step 0 = the shared start).
        accuracy: ``[E]`` held-out greedy accuracy at those steps.
        sampled: ``[E]`` held-out sampled accuracy (mean reward of samples at the training
            temperature) at those steps; NaN where the run did not log it.
        rl_steps: ``[S]`` RL steps 1..S.
        reward: ``[S]`` mean training reward of each step.
        step_seconds: ``[S]`` seconds of each RL step (rollout + reward + update; evaluation excluded).
        grad_norm: ``[S]`` gradient norm of each step (NaN where not logged).
        status: ``"done"``, ``"stopped"`` (non-finite stop or error before the last step) or ``"partial"``.
        max_steps: the run's planned number of RL steps.
        label, seed: free-form identification.
    """

    eval_steps: np.ndarray
    accuracy: np.ndarray
    rl_steps: np.ndarray
    reward: np.ndarray
    step_seconds: np.ndarray
    grad_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sampled: np.ndarray = field(default_factory=lambda: np.zeros(0))
    status: str = "done"
    max_steps: int = 0
    label: str = ""
    seed: int = 0

    def __post_init__(self):
        for name in ("eval_steps", "accuracy", "rl_steps", "reward", "step_seconds", "grad_norm", "sampled"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if self.eval_steps.shape != self.accuracy.shape:
            raise ValueError(f"eval_steps and accuracy must have the same shape, got {self.eval_steps.shape} "
                             f"and {self.accuracy.shape}")
        if not (self.rl_steps.shape == self.reward.shape == self.step_seconds.shape):
            raise ValueError(f"rl_steps, reward and step_seconds must have the same shape, got "
                             f"{self.rl_steps.shape}, {self.reward.shape}, {self.step_seconds.shape}")
        if self.grad_norm.size == 0:
            self.grad_norm = np.full(self.rl_steps.shape, np.nan)
        if self.sampled.size == 0:
            self.sampled = np.full(self.accuracy.shape, np.nan)
        if self.sampled.shape != self.accuracy.shape:
            raise ValueError(f"sampled and accuracy must have the same shape, got {self.sampled.shape} and "
                             f"{self.accuracy.shape}")
        if not self.max_steps:
            self.max_steps = int(self.rl_steps[-1]) if self.rl_steps.size else 0

    @property
    def last_step(self) -> int:
        """The last RL step the run logged (0 when it logged none)."""
        return int(self.rl_steps[-1]) if self.rl_steps.size else 0


def load_run(run_dir: str | os.PathLike, max_steps: int = 0, status: Optional[str] = None, label: str = "",
             seed: int = 0) -> RunCurve:
    """Read ``<run_dir>/metrics.jsonl`` (records with ``phase`` ``"rl"`` and ``"eval"``) into a :class:`RunCurve`.

    Args:
        run_dir: the run's ``--output-dir``.
        max_steps: planned RL steps (0 = the last logged step).
        status: force a status; by default ``"done"`` when the run logged ``max_steps`` steps, else ``"partial"``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run_dir {str(run_dir)!r} has no metrics.jsonl")
    recs = read_metrics(path)
    rl = sorted((r for r in recs if r.get("phase") == "rl"), key=lambda r: r["step"])
    ev = sorted((r for r in recs if r.get("phase") == "eval" and r.get("accuracy") is not None),
                key=lambda r: r["step"])
    nan = float("nan")
    curve = RunCurve(
        eval_steps=[r["step"] for r in ev], accuracy=[r["accuracy"] for r in ev],
        sampled=[nan if r.get("sampled_accuracy") is None else r["sampled_accuracy"] for r in ev] if ev else np.zeros(0),
        rl_steps=[r["step"] for r in rl], reward=[nan if r.get("reward") is None else r["reward"] for r in rl],
        step_seconds=[r.get("step_seconds") or 0.0 for r in rl],
        grad_norm=[nan if r.get("grad_norm") is None else r["grad_norm"] for r in rl] if rl else np.zeros(0),
        max_steps=max_steps, label=label, seed=seed)
    if status is None:
        status = "done" if curve.last_step >= curve.max_steps and curve.max_steps > 0 else "partial"
    curve.status = status
    return curve


def truncate(curve: RunCurve, max_step: int) -> RunCurve:
    """The part of ``curve`` at RL steps ``<= max_step`` (to compare runs extended to different lengths)."""
    e = curve.eval_steps <= max_step
    r = curve.rl_steps <= max_step
    return RunCurve(curve.eval_steps[e], curve.accuracy[e], curve.rl_steps[r], curve.reward[r], curve.step_seconds[r],
                    curve.grad_norm[r], curve.sampled[e], curve.status, min(curve.max_steps, max_step), curve.label,
                    curve.seed)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])`` -> ``[S]``."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    v = np.asarray(values, dtype=np.float64)  # [S]
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    c = np.concatenate([[0.0], np.cumsum(v)])  # [S + 1]
    idx = np.arange(v.size)
    lo = np.maximum(0, idx - window + 1)
    return (c[idx + 1] - c[lo]) / (idx + 1 - lo)


def steps_to_threshold(steps: Sequence[float], values: Sequence[float], threshold: float) -> Optional[float]:
    """The first step whose value is ``>= threshold``; ``None`` when the curve never reaches it."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps and values must be 1-D of the same length, got {s.shape} and {v.shape}")
    hit = np.nonzero(v >= threshold)[0]
    return float(s[hit[0]]) if hit.size else None


def seconds_to_step(curve: RunCurve, step: float) -> float:
    """Training seconds (sum of ``step_seconds`` of RL steps ``<= step``); 0 for step 0."""
    return float(curve.step_seconds[curve.rl_steps <= step].sum())


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``steps`` divided by the span: the curve's mean level."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps and values must be non-empty 1-D of the same length, got {s.shape} and {v.shape}")
    if s.size == 1 or s[-1] == s[0]:
        return float(v.mean())
    return float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0 / (s[-1] - s[0]))


def is_collapsed(accuracy: Sequence[float], margin: float = 0.05, tail: float = 0.25) -> bool:
    """A run *collapses* when its accuracy falls and stays below its start.

    With ``a_0`` the first value: the last ``max(2, ceil(tail * (E - 1)))`` evaluations are all below
    ``a_0 - margin``. Needs at least 3 evaluations (else ``False``).
    """
    a = np.asarray(accuracy, dtype=np.float64)
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if a.size < 3:
        return False
    k = max(2, math.ceil(tail * (a.size - 1)))
    return bool(np.all(a[-k:] < a[0] - margin))


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 10000,
                 level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """``(stat(values), lo, hi)``: percentile-bootstrap interval of ``stat`` (resampling values with replacement).

    One value gives ``(v, nan, nan)``; no value gives three NaNs. Identical values give a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    point = float(stat(x))
    if x.size == 1:
        return (point, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # [n_boot, n]
    boots = np.apply_along_axis(stat, 1, x[idx]) if stat is not np.mean else x[idx].mean(1)  # [n_boot]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return (point, float(lo), float(hi))


def ratio_ci(numer: Sequence[float], denom: Sequence[float], n_boot: int = 10000, level: float = 0.95,
             seed: int = 0) -> Tuple[float, float, float]:
    """``(mean(numer) / mean(denom), lo, hi)`` with a percentile-bootstrap interval.

    The two groups are resampled independently (different runs, not pairs). NaN when a group is empty
    or its mean is 0; the interval is NaN when a group has a single value.
    """
    a = np.asarray(numer, dtype=np.float64)
    b = np.asarray(denom, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"numer and denom must be 1-D, got shapes {a.shape} and {b.shape}")
    if a.size == 0 or b.size == 0 or b.mean() == 0:
        return (math.nan, math.nan, math.nan)
    point = float(a.mean() / b.mean())
    if a.size < 2 or b.size < 2:
        return (point, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)  # [n_boot]
    mb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(1)  # [n_boot]
    ok = mb != 0
    r = ma[ok] / mb[ok]
    al = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [al, 1.0 - al])
    return (point, float(lo), float(hi))


def _threshold_times(curve: RunCurve, kind: str, threshold: float, window: int) -> Tuple[float, float, bool]:
    """``(step, seconds, reached)``; an unreached threshold gives the run's last step (censored)."""
    if kind == "accuracy":
        step = steps_to_threshold(curve.eval_steps, curve.accuracy, threshold)
    elif kind == "reward":  # only full windows count (a 1-step "average" is one noisy batch)
        ma = moving_average(curve.reward, window)  # [S]
        step = steps_to_threshold(curve.rl_steps[window - 1:], ma[window - 1:], threshold) \
            if curve.rl_steps.size >= window else None
    else:
        raise ValueError(f"kind must be 'accuracy' or 'reward', got {kind!r}")
    if step is None:
        last = float(max(curve.last_step, curve.eval_steps[-1] if curve.eval_steps.size else 0))
        return last, seconds_to_step(curve, last), False
    return step, seconds_to_step(curve, step), True


def summarize(curves: Sequence[RunCurve], acc_thresholds: Sequence[float] = (), reward_thresholds: Sequence[float] = (),
              window: int = 10, collapse_margin: float = 0.05, collapse_tail: float = 0.25, n_boot: int = 10000,
              seed: int = 0) -> Dict:
    """Per-variant statistics over its seeds.

    Returns a dict with ``n`` (runs), ``final_accuracy``, ``auc``, ``final_reward_ma``, ``final_sampled``
    and ``sampled_auc`` (held-out sampled accuracy, over the runs that logged it at every evaluation) as
    ``(mean, lo, hi)``, ``collapse`` (count), ``stopped`` (runs that did not finish), ``max_grad_norm``
    and ``median_grad_norm`` (pre-clip, over every step of every run), and for every
    threshold ``("accuracy", t)`` / ``("reward", t)`` a dict of ``steps`` and ``seconds`` ``(mean, lo, hi)``,
    the raw per-run ``steps_list`` and ``reached`` (how many runs reached it; the others count at their
    last step, so the mean is then a lower bound).
    """
    if not curves:
        raise ValueError("curves must hold at least one run")
    out: Dict = {"n": len(curves), "stopped": sum(c.status != "done" for c in curves)}
    finals = [float(c.accuracy[-1]) for c in curves if c.accuracy.size]
    out["final_accuracy"] = bootstrap_ci(finals, n_boot=n_boot, seed=seed)
    out["start_accuracy"] = float(np.mean([c.accuracy[0] for c in curves if c.accuracy.size])) if finals else math.nan
    out["auc"] = bootstrap_ci([area_under_curve(c.eval_steps, c.accuracy) for c in curves if c.accuracy.size],
                              n_boot=n_boot, seed=seed)
    out["final_reward_ma"] = bootstrap_ci([float(moving_average(c.reward, window)[-1]) for c in curves
                                           if c.reward.size], n_boot=n_boot, seed=seed)
    sampled = [c for c in curves if c.sampled.size and np.isfinite(c.sampled).all()]  # runs that logged it
    out["final_sampled"] = bootstrap_ci([float(c.sampled[-1]) for c in sampled], n_boot=n_boot, seed=seed)
    out["sampled_auc"] = bootstrap_ci([area_under_curve(c.eval_steps, c.sampled) for c in sampled], n_boot=n_boot,
                                      seed=seed)
    out["collapse"] = sum((c.status == "stopped") or is_collapsed(c.accuracy, collapse_margin, collapse_tail)
                          for c in curves)
    norms = np.concatenate([c.grad_norm[np.isfinite(c.grad_norm)] for c in curves])  # [sum of logged steps]
    out["median_grad_norm"] = float(np.median(norms)) if norms.size else math.nan
    out["max_grad_norm"] = float(np.nanmax([np.nanmax(c.grad_norm) if np.isfinite(c.grad_norm).any() else np.nan
                                            for c in curves])) if any(np.isfinite(c.grad_norm).any() for c in curves) \
        else math.nan
    for kind, ths in (("accuracy", acc_thresholds), ("reward", reward_thresholds)):
        for t in ths:
            res = [_threshold_times(c, kind, float(t), window) for c in curves]
            steps = [r[0] for r in res]
            out[(kind, float(t))] = {
                "steps": bootstrap_ci(steps, n_boot=n_boot, seed=seed),
                "seconds": bootstrap_ci([r[1] for r in res], n_boot=n_boot, seed=seed),
                "steps_list": steps,
                "reached": sum(r[2] for r in res),
            }
    return out


def compare(summaries: Dict[str, Dict], baseline: str, key: Tuple[str, float], n_boot: int = 10000,
            seed: int = 0) -> Dict[str, Tuple[float, float, float]]:
    """Ratio of mean steps-to-threshold ``variant / baseline`` with its bootstrap interval, per variant.

    A ratio below 1 means the variant needs fewer steps (is faster) than ``baseline``.
    """
    if baseline not in summaries:
        raise ValueError(f"baseline must be one of {sorted(summaries)}, got {baseline!r}")
    base = summaries[baseline][key]["steps_list"]
    return {name: ratio_ci(s[key]["steps_list"], base, n_boot=n_boot, seed=seed) for name, s in summaries.items()}


def fmt_ci(ci: Tuple[float, float, float], digits: int = 2, lower_bound: bool = False) -> str:
    """``"0.41 [0.37, 0.45]"``; ``"n/a"`` for NaN; a leading ``>=`` marks a censored (lower-bound) mean."""
    p, lo, hi = ci
    if p is None or not math.isfinite(p):
        return "n/a"
    s = f"{p:.{digits}f}"
    if math.isfinite(lo) and math.isfinite(hi):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return (">=" if lower_bound else "") + s


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row must have {len(headers)} cells (the headers)")
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _curve_matrix(curves: Sequence[RunCurve], metric: str, window: int) -> Tuple[np.ndarray, np.ndarray]:
    """Steps ``[K]`` of the longest run and values ``[n, K]``, NaN past the end of shorter (stopped) runs."""
    if metric == "accuracy":
        xs, ys = [c.eval_steps for c in curves], [c.accuracy for c in curves]
    elif metric == "sampled":
        xs, ys = [c.eval_steps for c in curves], [c.sampled for c in curves]
    elif metric == "reward":
        xs, ys = [c.rl_steps for c in curves], [moving_average(c.reward, window) for c in curves]
    else:
        raise ValueError(f"metric must be 'accuracy', 'sampled' or 'reward', got {metric!r}")
    x = max(xs, key=len)
    out = np.full((len(curves), x.size), np.nan)  # [n, K]
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        idx = np.searchsorted(x, xi)
        ok = (idx < x.size) & (x[np.minimum(idx, x.size - 1)] == xi)
        out[i, idx[ok]] = yi[ok]
    return x, out


def plot_curves(groups: Dict[str, Sequence[RunCurve]], png: str | os.PathLike, metric: str = "accuracy",
                window: int = 10, title: str = "", thresholds: Sequence[float] = ()) -> Path:
    """Mean curve per variant with a shaded band spanning its seeds (min to max), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, curves) in enumerate(groups.items()):
        curves = [c for c in curves if (c.rl_steps.size if metric == "reward" else c.accuracy.size)]
        if not curves:
            continue
        x, y = _curve_matrix(curves, metric, window)  # [K], [n, K]
        col = colors[i % len(colors)]
        with np.errstate(all="ignore"):
            ax.plot(x, np.nanmean(y, 0), color=col, lw=2, label=f"{name} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=col, alpha=0.15, lw=0)
    for t in thresholds:
        ax.axhline(t, color="grey", ls=":", lw=1)
    ax.set_xlabel("RL step")
    ax.set_ylabel({"accuracy": "held-out accuracy (greedy)", "sampled": "held-out accuracy (sampled)"}.get(
        metric, f"train reward ({window}-step mean)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or ("mean over seeds; band = min..max over seeds"), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def plot_threshold_bars(summaries: Dict[str, Dict], keys: Sequence[Tuple[str, float]], png: str | os.PathLike,
                        title: str = "") -> Path:
    """Mean steps-to-threshold per variant with 95% bootstrap intervals, one panel per threshold, as a PNG.

    Hatched bars are lower bounds (some seeds never reached the threshold; they count at their last step);
    the label above a bar is ``reached/seeds``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keys:
        raise ValueError("keys must name at least one threshold")
    names = list(summaries)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 0.55 * len(names) * len(keys) + 1.5), 4.2),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = np.arange(len(names))
        means, lo_err, hi_err = [], [], []
        for n in names:
            p, lo, hi = summaries[n][key]["steps"]
            means.append(p)
            lo_err.append(p - lo if math.isfinite(lo) else 0.0)
            hi_err.append(hi - p if math.isfinite(hi) else 0.0)
        bars = ax.bar(xs, means, 0.7, yerr=[lo_err, hi_err], capsize=3,
                      color=[colors[i % len(colors)] for i in range(len(names))])
        for b, n in zip(bars, names):
            e = summaries[n][key]
            if e["reached"] < summaries[n]["n"]:
                b.set_hatch("//")
                b.set_alpha(0.6)
            ax.annotate(f"{e['reached']}/{summaries[n]['n']}", (b.get_x() + b.get_width() / 2, 0),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
        kind, t = key
        ax.set_title(f"{'held-out acc' if kind == 'accuracy' else 'reward MA'} >= {t:g}", fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("RL steps to threshold (mean, 95% CI)")
    fig.suptitle(title or "steps to threshold (hatched: some seeds never reached it, lower bound)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


# --------------------------------------------------------------------------- learning-rate selection

def lr_tag(lr: float) -> str:
    """A folder-safe, round-trippable name for a learning rate: ``1e-04`` -> ``"lr1e-04"``."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return f"lr{lr:.0e}" if float(f"{lr:.0e}") == lr else f"lr{lr:.3g}"


def next_rung(lr: float, direction: int) -> float:
    """The neighbour of ``lr`` on the 1-2-5 ladder (..., 1e-5, 2e-5, 5e-5, 1e-4, ...): ``direction``
    ``+1`` the next larger rung, ``-1`` the next smaller. ``lr`` need not be on the ladder."""
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 or +1, got {direction!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    k = math.floor(math.log10(lr)) - 1
    ladder = [float(f"{m}e{e}") for e in range(k, k + 3) for m in (1, 2, 5)]  # sorted, spans lr
    if direction > 0:
        return next(x for x in ladder if x > lr * (1 + 1e-9))
    return [x for x in ladder if x < lr * (1 - 1e-9)][-1]


def selection_score(curve: RunCurve, max_steps: int) -> float:
    """The selection statistic of one run: the AUC (trapezoid mean, :func:`area_under_curve`) of its
    held-out greedy accuracy over RL steps ``0..max_steps``.

    A run that stopped early (non-finite loss) counts as accuracy 0 from its last evaluation to
    ``max_steps``: a rate that blows the run up is never the best. NaN for a run with no evaluation.
    """
    if not curve.accuracy.size:
        return math.nan
    s, a = curve.eval_steps, curve.accuracy
    if curve.status == "stopped" and s[-1] < max_steps:
        s = np.concatenate([s, [s[-1], float(max_steps)]])
        a = np.concatenate([a, [0.0, 0.0]])
    return area_under_curve(s, a)


def choose_lr(scores: Dict[float, Sequence[float]]) -> Tuple[float, int]:
    """The learning rate with the highest mean score, and where it sits on the grid.

    Args:
        scores: ``{lr: [score of each selection seed]}`` (NaN scores are ignored; a rate with none left is skipped).
    Returns:
        ``(lr, edge)``: ``edge`` is ``-1`` when the best rate is the smallest of the grid, ``+1`` the
        largest, ``0`` inside (a grid of one rate: ``0``). Ties go to the smaller rate.
    """
    means = {lr: float(np.nanmean(v)) for lr, v in scores.items() if np.isfinite(np.asarray(v, float)).any()}
    if not means:
        raise ValueError("scores must hold at least one learning rate with a finite score")
    grid = sorted(means)
    best = max(grid, key=lambda lr: (means[lr], -lr))
    edge = 0 if len(grid) == 1 else -1 if best == grid[0] else 1 if best == grid[-1] else 0
    return best, edge


# --------------------------------------------------------------------------- more figures

def plot_forest(ratios: Dict[str, Dict[str, Tuple[float, float, float]]], png: str | os.PathLike, baseline: str,
                title: str = "", censored: Optional[Dict[str, Dict[str, bool]]] = None) -> Path:
    """Forest plot of steps-to-threshold ratios ``method / baseline`` with their 95% intervals.

    Args:
        ratios: ``{panel label (a threshold): {method: (ratio, lo, hi)}}``; one panel per label,
            one row per method, log x axis, a line at 1 (left of it = faster than ``baseline``).
        censored: ``{panel: {method: True}}`` draws that estimate hollow (a seed never reached the threshold).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not ratios:
        raise ValueError("ratios must hold at least one panel")
    panels = list(ratios)
    methods = list(dict.fromkeys(m for p in panels for m in ratios[p] if m != baseline))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.6, 0.38 * len(methods) + 1.6),
                             squeeze=False, sharey=True)
    ys = np.arange(len(methods))[::-1]
    for ax, panel in zip(axes[0], panels):
        for y, m in zip(ys, methods):
            p, lo, hi = ratios[panel].get(m, (math.nan, math.nan, math.nan))
            if not math.isfinite(p):
                continue
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([lo, hi], [y, y], color="k", lw=1.2)
            cens = bool((censored or {}).get(panel, {}).get(m))
            ax.plot([p], [y], "o", color="C0", mfc="white" if cens else "C0", ms=6)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        lo_x, hi_x = ax.get_xlim()
        lo_x, hi_x = min(lo_x, 0.9), max(hi_x, 1.12)  # a panel whose every ratio is 1 still gets a readable axis
        ax.set_xlim(lo_x, hi_x)
        ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0) if lo_x <= t <= hi_x]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(panel, fontsize=9)
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.set_xlabel(f"steps ratio / {baseline}")
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(methods, fontsize=8)
    fig.suptitle(title or f"steps to threshold relative to {baseline} (95% bootstrap CI; hollow = censored)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def plot_lr_sensitivity(results: Dict[str, Dict[float, Sequence[float]]], png: str | os.PathLike,
                        chosen: Optional[Dict[str, float]] = None, title: str = "",
                        ylabel: str = "validation AUC (greedy accuracy)") -> Path:
    """Each method's selection score against the learning rate (log x): mean over seeds, every seed
    as a dot, the chosen rate ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results must hold at least one method")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (m, by_lr) in enumerate(results.items()):
        col = f"C{i % 10}"
        lrs = sorted(by_lr)
        with np.errstate(all="ignore"):
            means = [float(np.nanmean(by_lr[lr])) if len(by_lr[lr]) else math.nan for lr in lrs]
        ax.plot(lrs, means, "-", color=col, lw=1.5, label=m)
        for lr in lrs:
            ax.plot([lr] * len(by_lr[lr]), by_lr[lr], ".", color=col, alpha=0.5)
        if chosen and m in chosen and chosen[m] in by_lr:
            ax.plot([chosen[m]], [means[lrs.index(chosen[m])]], "o", mfc="none", mec=col, ms=11, mew=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=7, ncol=2)
    ax.set_title(title or "learning-rate sensitivity (ring = chosen rate)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
