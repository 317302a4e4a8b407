"""The study's analysis and results page: tables, intervals and plots from the run folders
(:mod:`study.stats`), and the whole ``docs/results.md`` page (``--report``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from study.plan import (BASELINE, CUTS, METHODS, STUDY_DEFAULTS, TASKS, Plan, final_dir, is_done,
                        read_done, selection_state)

def with_shared_start(curve, sft_dir: Path):
    """``curve`` with the shared warm-up's held-out accuracy as its step-0 point when the run itself did
    not evaluate before its first RL step (every run starts from those weights)."""
    import numpy as np

    if curve.eval_steps.size and curve.eval_steps[0] == 0:
        return curve
    f = sft_dir / "metrics.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    start = [r for r in recs if r.get("phase") == "eval" and r.get("step") == 0 and r.get("accuracy") is not None]
    if not start:
        return curve
    curve.eval_steps = np.concatenate([[0.0], curve.eval_steps])
    curve.accuracy = np.concatenate([[float(start[-1]["accuracy"])], curve.accuracy])
    sampled = start[-1].get("sampled_accuracy")
    curve.sampled = np.concatenate([[np.nan if sampled is None else float(sampled)], curve.sampled])
    return curve


def _key_label(key, window: int) -> str:
    kind, t = key
    return f"held-out acc >= {t:g}" if kind == "accuracy" else f"reward MA{window} >= {t:g}"


def headline(sums: Dict[str, dict], ratios: Dict[tuple, dict], keys: List[tuple], window: int) -> List[str]:
    """One line per threshold: the fastest method (fewest mean steps among those whose every seed reached
    it), its ratio to GRPO, and which methods' ratio intervals lie wholly below / above 1."""
    from study import stats as S

    lines = []
    for k in keys:
        full = {m: s for m, s in sums.items() if s[k]["reached"] == s["n"]}
        lab = _key_label(k, window)
        if not full:
            lines.append(f"{lab}: no method reached it in every seed")
            continue
        best = min(full, key=lambda m: full[m][k]["steps"][0])
        r = ratios.get(k, {})
        faster = [m for m, v in r.items() if m != BASELINE and math.isfinite(v[2]) and v[2] < 1.0]
        slower = [m for m, v in r.items() if m != BASELINE and math.isfinite(v[1]) and v[1] > 1.0]
        txt = f"{lab}: fastest {best}, {S.fmt_ci(full[best][k]['steps'], 1)} steps, " \
              f"{S.fmt_ci(full[best][k]['seconds'], 1)} train s"
        if best != BASELINE and best in r:
            txt += f", ratio / {BASELINE} {S.fmt_ci(r[best], 2)}"
        txt += f"; interval wholly below 1 (faster than {BASELINE}): {', '.join(faster) or 'none'}; wholly above 1 " \
               f"(slower): {', '.join(slower) or 'none'}"
        lines.append(txt)
    return lines


def censored(sums: Dict[str, dict], method: str, key: tuple) -> bool:
    """Whether ``method``'s steps ratio to the baseline at ``key`` involves a seed that never reached the
    threshold (its own or the baseline's), so the ratio is a bound, not an estimate."""
    def short(m: str) -> bool:
        return m in sums and sums[m][key]["reached"] < sums[m]["n"]

    return short(method) or short(BASELINE)


def analyze(out: Path, plan: Plan, acc_th: Optional[List[float]], rew_th: Optional[List[float]], window: int,
            img_dir: Path, n_boot: int, collapse_margin: float) -> Tuple[str, dict]:
    """Tables (Markdown, returned and written to ``<out>/results.md``), ``summary.json`` and PNGs.

    Returns the Markdown and ``{task: {"headline": [...], "images": [...]}}`` for the report writer."""
    from study import stats as S

    img_dir.mkdir(parents=True, exist_ok=True)
    md: List[str] = []
    js: dict = {}
    info: dict = {}
    overview: Dict[str, dict] = {}  # task -> the first held-out threshold's ratios and every method's AUC
    for task in plan.tasks:
        states = {m: selection_state(out, plan, task, m) for m in plan.methods[task]}
        groups: Dict[str, list] = {}
        missing: List[str] = []
        for m in plan.methods[task]:
            lr = states[m]["lr"]
            for s in plan.seeds:
                d = final_dir(out, task, m, lr, s) if lr is not None else None
                if d is None or not is_done(d, plan.steps[task]):
                    missing.append(f"{m}/seed{s}")
                    continue
                st = read_done(d)
                c = S.truncate(S.load_run(d, max_steps=st.get("max_steps", plan.steps[task]), label=m, seed=s,
                                          status="done" if st["status"] == "done" else "stopped"), plan.steps[task])
                groups.setdefault(m, []).append(with_shared_start(c, out / task / "sft"))
        md.append(f"### Task `{task}`: {TASKS[task]['desc']}\n")
        images: List[str] = []
        # lr selection table and sensitivity plot
        if plan.selecting:
            lrs = sorted({lr for st in states.values() for lr in st["scores"]})
            rows = []
            for m, st in states.items():
                cells = []
                for lr in lrs:
                    v = st["scores"].get(lr)
                    cell = "" if not v else f"{float(sum(v) / len(v)):.3f}"
                    cells.append(f"**{cell}**" if v and lr == st["lr"] else cell)
                note = "selection unfinished" if st["lr"] is None else \
                    ("extended " + ", ".join(f"{x:g}" for x in st["extended"]) if st["extended"] else "") + \
                    ("; best still at the edge" if st["edge"] else "")
                rows.append([m, "n/a" if st["lr"] is None else f"{st['lr']:g}"] + cells + [note.strip("; ")])
            md.append("Learning-rate selection (validation split, selection seeds "
                      f"{plan.select_seeds}): mean AUC of held-out validation greedy accuracy over RL steps "
                      f"0-{plan.select_steps[task]}; bold = chosen.\n")
            md.append(S.markdown_table(["method", "chosen lr"] + [f"{lr:g}" for lr in lrs] + ["note"], rows) + "\n")
            sens = {m: st["scores"] for m, st in states.items() if st["scores"]}
            if sens:
                p = S.plot_lr_sensitivity(sens, img_dir / f"study_{task}_lr.png",
                                          {m: st["lr"] for m, st in states.items() if st["lr"] is not None},
                                          f"{task}: validation AUC vs learning rate (ring = chosen)")
                images.append(p.name)
        if not groups:
            md.append("No reported runs yet.\n")
            info[task] = {"headline": [], "images": images}
            continue
        ath = acc_th if acc_th is not None else list(TASKS[task]["acc"])
        rth = rew_th if rew_th is not None else list(TASKS[task]["reward"])
        sums = {m: S.summarize(cs, ath, rth, window=window, collapse_margin=collapse_margin, n_boot=n_boot)
                for m, cs in groups.items()}
        keys = [("accuracy", t) for t in ath] + [("reward", t) for t in rth]
        ratios = {k: S.compare(sums, BASELINE, k, n_boot=n_boot) for k in keys} if BASELINE in sums else {}
        start = next(iter(groups.values()))[0]
        md.append(f"Shared SFT start: held-out greedy accuracy {start.accuracy[0]:.3f}"
                  + (f", sampled {start.sampled[0]:.3f}" if math.isfinite(start.sampled[0]) else "")
                  + ". Reported runs: " + ", ".join(f"{m} {len(cs)}" for m, cs in groups.items()) + ".\n")
        rows = []
        for m, s in sums.items():
            rows.append([m, f"{states[m]['lr']:g}", s["n"], S.fmt_ci(s["final_accuracy"], 3),
                         S.fmt_ci(s["final_sampled"], 3), S.fmt_ci(s["auc"], 3), S.fmt_ci(s["final_reward_ma"], 3),
                         f"{s['collapse']}/{s['n']}",
                         "n/a" if not math.isfinite(s["max_grad_norm"]) else
                         f"{s['median_grad_norm']:.2f} / {s['max_grad_norm']:.2f}"])
        md.append(S.markdown_table(["method", "lr", "seeds", "final held-out acc (greedy)", "final held-out acc "
                                    "(sampled)", "AUC (greedy)", f"final reward MA{window}", "collapsed",
                                    "grad norm median / max"], rows) + "\n")
        rows = []
        for k in keys:
            for m, s in sums.items():
                e = s[k]
                lb = e["reached"] < s["n"]
                r = ratios.get(k, {}).get(m)
                cens = censored(sums, m, k)
                ratio = "n/a" if r is None else "1 (baseline)" if m == BASELINE else \
                    S.fmt_ci(r, 2) + (" (censored)" if cens else "")
                rows.append([_key_label(k, window), m, f"{e['reached']}/{s['n']}", S.fmt_ci(e["steps"], 1, lb),
                             S.fmt_ci(e["seconds"], 1, lb), ratio])
        md.append(S.markdown_table(["threshold", "method", "reached", "steps (mean [95% CI])", "train seconds",
                                    f"steps ratio / {BASELINE} [95% CI]"], rows) + "\n")
        md.append("Steps and seconds: means over seeds with 95% percentile-bootstrap intervals; `>=` marks a lower "
                  "bound (a seed that never reached the threshold counts at its last step); a ratio marked "
                  "(censored) involves such seeds. Train seconds = sum of the recipe's per-step times (rollout, "
                  "reward, update; evaluation excluded). Grad norm: pre-clip, over every step of every seed.\n")
        if missing:
            md.append("Not run (or unfinished): " + ", ".join(missing) + "\n")
        S.plot_curves(groups, img_dir / f"study_{task}_accuracy.png", "accuracy", window,
                      f"{task}: held-out greedy accuracy (mean; band = seed min..max)", ath)
        images.append(f"study_{task}_accuracy.png")
        if any(c.sampled.size and math.isfinite(c.sampled[-1]) for cs in groups.values() for c in cs):
            S.plot_curves(groups, img_dir / f"study_{task}_sampled.png", "sampled", window,
                          f"{task}: held-out sampled accuracy (mean; band = seed min..max)")
            images.append(f"study_{task}_sampled.png")
        S.plot_curves(groups, img_dir / f"study_{task}_reward.png", "reward", window,
                      f"{task}: train reward, {window}-step moving average (mean; band = seed min..max)", rth)
        S.plot_threshold_bars(sums, keys, img_dir / f"study_{task}_steps.png",
                              f"{task}: RL steps to threshold (95% bootstrap CI; hatched = lower bound)")
        images += [f"study_{task}_reward.png", f"study_{task}_steps.png"]
        if ratios and len(sums) > 1:
            cens = {_key_label(k, window): {m: censored(sums, m, k) for m in sums} for k in keys}
            S.plot_forest({_key_label(k, window): ratios[k] for k in keys}, img_dir / f"study_{task}_forest.png",
                          BASELINE, f"{task}: steps to threshold / {BASELINE} (95% CI; hollow = censored)", cens)
            images.append(f"study_{task}_forest.png")
        k0 = keys[0]
        overview[task] = {"label": _key_label(k0, window), "ratios": ratios.get(k0, {}),
                          "censored": {m: censored(sums, m, k0) for m in sums},
                          "auc": {m: s["auc"] for m, s in sums.items()}, "lr": {m: states[m]["lr"] for m in sums}}
        js[task] = {m: {("/".join(map(str, k)) if isinstance(k, tuple) else k): val for k, val in s.items()}
                    for m, s in sums.items()}
        js[task]["_ratios"] = {"/".join(map(str, k)): r for k, r in ratios.items()}
        js[task]["_lr"] = {m: st["lr"] for m, st in states.items()}
        info[task] = {"headline": headline(sums, ratios, keys, window), "images": images}
    info["_overview"] = overview_section(overview, img_dir)
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(js, indent=1, default=str))
    return text, info


def overview_section(overview: Dict[str, dict], img_dir: Path) -> dict:
    """Across tasks: a table of every method's AUC of held-out greedy accuracy (mean [95% CI], chosen lr)
    per task, and one forest plot of the steps ratio to the baseline at each task's first held-out
    accuracy threshold (``study_overview_forest.png``). Returns ``{"table": markdown, "images": [...]}``."""
    from study import stats as S

    if not overview:
        return {"table": "", "images": []}
    tasks = list(overview)
    methods = list(dict.fromkeys(m for t in tasks for m in overview[t]["auc"]))
    rows = []
    for m in methods:
        cells = []
        for t in tasks:
            a = overview[t]["auc"].get(m)
            cells.append("" if a is None else f"{S.fmt_ci(a, 3)} ({overview[t]['lr'][m]:g})")
        rows.append([m] + cells)
    table = S.markdown_table(["method"] + [f"`{t}`: AUC (lr)" for t in tasks], rows)
    images = []
    panels = {f"{t}: {overview[t]['label']}": overview[t]["ratios"] for t in tasks if overview[t]["ratios"]}
    if panels and any(m != BASELINE for p in panels.values() for m in p):
        cens = {f"{t}: {overview[t]['label']}": overview[t]["censored"] for t in tasks if overview[t]["ratios"]}
        S.plot_forest(panels, img_dir / "study_overview_forest.png", BASELINE,
                      f"every task: steps to its first held-out accuracy threshold / {BASELINE} "
                      "(95% CI; hollow = censored)", cens)
        images.append("study_overview_forest.png")
    return {"table": table, "images": images}


CONCLUSION_START, CONCLUSION_END = "<!-- conclusion:start -->", "<!-- conclusion:end -->"


def write_report(path: Path, plan: Plan, tables: str, info: dict, img_dir: Path, command: str,
                 history: Sequence[str] = ()) -> Path:
    """Write the whole results page (``docs/results.md``): the conclusion first, then the automatic
    headline per task, the set-up, the command, and every table and figure, from the run folders.

    The conclusion is the human-written text between ``<!-- conclusion:start -->`` and
    ``<!-- conclusion:end -->`` of the existing file (kept as it is); a new page gets a placeholder."""
    old = path.read_text() if path.is_file() else ""
    if CONCLUSION_START in old and CONCLUSION_END in old:
        conclusion = old.split(CONCLUSION_START, 1)[1].split(CONCLUSION_END, 1)[0].strip("\n")
    else:
        conclusion = "_Not written yet: summarise the headline below, plainly, whatever it says._"
    rel = os.path.relpath(img_dir, path.parent)
    md = ["# Learning study: which credit assignment trains fastest, each method at its own learning rate", "",
          f"Generated by `benchmarks/learning_study.py --report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
          "from the run folders; edit only the conclusion (between the markers), rerun to refresh the rest.", "",
          "## Conclusion", "", CONCLUSION_START, conclusion, CONCLUSION_END, "", "## Headline per task (automatic)", ""]
    for task in plan.tasks:
        md.append(f"- **`{task}`**: " + ("; ".join(info.get(task, {}).get("headline", [])) or "no reported runs yet"))
    ov = info.get("_overview", {})
    if ov.get("table"):
        md += ["", "## Across tasks (automatic)", "",
               "AUC = mean held-out greedy accuracy (test split) over the reported run's evaluations, mean over "
               "seeds [95% bootstrap CI]; in brackets the learning rate each method got from the selection.", "",
               ov["table"], ""]
        md += [f"![across tasks {Path(i).stem}]({rel}/{i})" for i in ov.get("images", [])]
    md += ["", "## Set-up", "", "```", plan.describe(), "", CUTS, "```", "",
           f"Study defaults of every run: `{STUDY_DEFAULTS}`. Methods: "
           + "; ".join(f"`{m}` = {METHODS[m]}" for m in dict.fromkeys(x for t in plan.tasks for x in plan.methods[t]))
           + ".", "",
           "## How it was run", "", "```bash", command, "```", "",
           "The raw per-run metrics of the published sweep are in `benchmarks/study/results/` (its README: "
           "tables and plots again without rerunning).", "", "Invocations (date, wall time, machine):", "",
           *history, "", "## Results", "", tables, ""]
    for task in plan.tasks:
        imgs = info.get(task, {}).get("images", [])
        if imgs:
            md.append(f"Figures for `{task}`:\n")
            md += [f"![{task} {Path(i).stem}]({rel}/{i})" for i in imgs]
            md.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))
    return path
