"""Evaluate a generator on math benchmarks: generate (with a resumable cache), check, score.

    from creditlib.eval import evaluate, HFGenerator
    gen = HFGenerator("Qwen/Qwen2.5-Math-1.5B", temperature=0.6, max_new_tokens=3072)
    res = evaluate(gen, ["math500", "aime24"], n_samples=8, data_dir="data", cache_path="gens.jsonl")
    print(res.table())
    res.save("results.json")

Generations are appended to a JSONL cache as soon as each chunk of prompts is done, one line
per sample keyed by (benchmark, problem id, sample index) together with a fingerprint of the
generation settings; rerunning the same command skips everything already in the cache, so an
interrupted evaluation continues where it stopped. Lines written under other settings (another
model, temperature, prompt, ...) are ignored, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .data import BENCHMARKS, load_benchmark
from .generation import DEFAULT_PROMPT, Generator, build_prompt
from .metrics import benchmark_metrics
from .verify import DEFAULT_TIMEOUT, is_correct_batch

__all__ = ["evaluate", "EvalResult", "GenerationCache", "DISPLAY_NAMES", "problem_id"]

DISPLAY_NAMES = {
    "gsm8k": "GSM8K",
    "math500": "MATH500",
    "aime24": "AIME24",
    "amc23": "AMC23",
    "minerva_math": "Minerva",
    "olympiadbench": "OlympiadBench",
}


def problem_id(index: int, problem: str) -> str:
    """Cache id of a problem: its row index and a hash of its text (so a different file with
    other problems at the same index never reuses a generation)."""
    return f"{index}:{hashlib.sha1(problem.encode('utf-8')).hexdigest()[:12]}"


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class GenerationCache:
    """Append-only JSONL store of generations keyed by (benchmark, problem id, sample).

    Args:
        path: the JSONL file (created with its folder if missing).
        settings: the generation settings; only lines written under the same settings are read.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = os.fspath(path)
        self.fp = _fingerprint(settings)
        self.settings = dict(settings)
        self._data: dict[tuple[str, str, int], str] = {}
        self.ignored = 0  # lines from other settings, or unreadable (a line cut by a crash)
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        key = (rec["benchmark"], rec["problem_id"], int(rec["sample"]))
                        if rec.get("fp") != self.fp or not isinstance(rec.get("completion"), str):
                            self.ignored += 1
                            continue
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        self.ignored += 1
                        continue
                    self._data[key] = rec["completion"]
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, benchmark: str, pid: str, sample: int) -> str | None:
        return self._data.get((benchmark, pid, sample))

    def add_many(self, records: Sequence[tuple[str, str, int, str]]) -> None:
        """Store ``(benchmark, problem id, sample, completion)`` records and flush them to disk."""
        lines = []
        for bench, pid, s, text in records:
            self._data[(bench, pid, s)] = text
            lines.append(json.dumps({"benchmark": bench, "problem_id": pid, "sample": s, "fp": self.fp,
                                     "completion": text}, ensure_ascii=False))
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                # a line cut short by a crash is skipped on reading; start on a fresh line
                if f.tell() > 0:
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write("\n")
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class EvalResult:
    """Scores per benchmark plus their average, with the settings that produced them."""

    metrics: dict[str, dict[str, float]]
    settings: dict[str, Any]
    per_problem: dict[str, list[int]] = field(default_factory=dict)  # correct samples per problem
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def average(self) -> dict[str, float]:
        """Unweighted mean over benchmarks of every score they all report (the paper's "Avg.")."""
        names = list(self.metrics)
        if not names:
            return {}
        keys = [k for k in self.metrics[names[0]] if k.startswith(("pass@", "avg@"))]
        keys = [k for k in keys if all(k in self.metrics[b] for b in names)]
        return {k: sum(self.metrics[b][k] for b in names) / len(names) for k in keys}

    def table(self, fmt: str = "markdown") -> str:
        """The paper-style table: one row per score (in %), one column per benchmark, then the
        average. ``fmt`` is ``"markdown"`` or ``"plain"``."""
        if fmt not in ("markdown", "plain"):
            raise ValueError(f"fmt must be 'markdown' or 'plain', got {fmt!r}")
        names = list(self.metrics)
        avg = self.average
        keys = list(avg)
        # pass@1 first, then avg@n, then pass@k by k
        keys.sort(key=lambda k: (0 if k == "pass@1" else 1 if k.startswith("avg@") else 2, int(k.split("@")[1])))
        header = ["score"] + [DISPLAY_NAMES.get(b, b) for b in names] + ["Average"]
        rows = [[k] + [f"{100 * self.metrics[b][k]:.1f}" for b in names] + [f"{100 * avg[k]:.1f}"] for k in keys]
        rows.append(["problems"] + [str(int(self.metrics[b]["n_problems"])) for b in names] + [""])
        if fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            return "\n".join(lines)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "benchmarks": self.metrics, "average": self.average,
                "correct_per_problem": self.per_problem, "seconds": self.seconds}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (folders created)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)


def _load(names, datasets, paths, data_dir, limit):
    out = {}
    for name in names:
        if name not in BENCHMARKS:
            raise ValueError(f"benchmarks must be among {sorted(BENCHMARKS)}, got {name!r}")
        if datasets and name in datasets:
            ds = datasets[name]
        elif paths and name in paths:
            ds = load_benchmark(name, path=paths[name])
        elif data_dir is not None:
            ds = load_benchmark(name, path=data_dir)
        else:
            ds = load_benchmark(name)
        rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
        if limit is not None:
            rows = rows[:limit]
        out[name] = rows
    return out


def evaluate(
    generator: Generator,
    benchmarks: Sequence[str],
    *,
    n_samples: int = 1,
    ks: Sequence[int] | None = None,
    datasets: Mapping[str, Any] | None = None,
    paths: Mapping[str, str] | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    prompt_template: str = DEFAULT_PROMPT,
    cache_path: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    chunk_size: int = 16,
    timeout: float = DEFAULT_TIMEOUT,
    last_number_fallback: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Generate ``n_samples`` completions per problem, check them, and score each benchmark.

    Args:
        generator: any :class:`~creditlib.eval.generation.Generator`.
        benchmarks: benchmark names (see :data:`creditlib.eval.data.BENCHMARKS`).
        n_samples: completions per problem (``n``); pass@k is reported for ``ks``.
        ks: k values for pass@k (default: powers of two up to ``n`` and ``n``).
        datasets / paths / data_dir: where the problems come from, by priority: ready datasets
            (``{name: Dataset or rows}``), ``{name: local file}``, a folder with
            ``<name>/test.jsonl``; otherwise the Hugging Face Hub.
        limit: keep only the first ``limit`` problems of each benchmark (smoke tests).
        prompt_template: user message with a ``{problem}`` field.
        cache_path: JSONL generation cache (resumable); None keeps generations in memory only.
        settings: what identifies the generations in the cache (model, sampling parameters...);
            the prompt template and ``n_samples`` are added. Use the same settings to resume.
        chunk_size: prompts per generator call (the cache is written after each call).
        timeout: per-answer verification time limit in seconds.
        last_number_fallback: accept a bare last number when an output states no answer.
        progress: show a tqdm progress bar over samples to generate.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(benchmarks, str) or not benchmarks:
        raise ValueError(f"benchmarks must be a non-empty list of names, got {benchmarks!r}")
    if not hasattr(generator, "generate"):
        raise ValueError("generator must have a generate(prompts, n) method")
    rows_by = _load(list(benchmarks), datasets, paths, data_dir, limit)
    full_settings = dict(settings or {})
    full_settings.update(prompt_template=prompt_template)
    cache = GenerationCache(cache_path, full_settings) if cache_path is not None else None
    memory: dict[tuple[str, str, int], str] = {}

    def lookup(b, pid, s):
        return cache.get(b, pid, s) if cache is not None else memory.get((b, pid, s))

    # work: (benchmark, pid, prompt, missing sample indices)
    work = []
    for b, rows in rows_by.items():
        for i, r in enumerate(rows):
            pid = problem_id(i, r["problem"])
            missing = [s for s in range(n_samples) if lookup(b, pid, s) is None]
            if missing:
                work.append((b, pid, build_prompt(r["problem"], prompt_template), missing))
    total = sum(len(m) for *_, m in work)
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="generating", unit="sample")
    t_gen = time.perf_counter()
    # group by the number of missing samples (normally all n), then chunk
    by_count: dict[int, list] = {}
    for w in work:
        by_count.setdefault(len(w[3]), []).append(w)
    try:
        for m, items in by_count.items():
            for start in range(0, len(items), chunk_size):
                chunk = items[start:start + chunk_size]
                outs = generator.generate([w[2] for w in chunk], m)
                if len(outs) != len(chunk) or any(len(o) != m for o in outs):
                    raise RuntimeError(f"generator returned {len(outs)} lists for {len(chunk)} prompts "
                                       f"(expected {m} completions each)")
                recs = []
                for (b, pid, _, missing), comps in zip(chunk, outs):
                    for s, text in zip(missing, comps):
                        recs.append((b, pid, s, text if isinstance(text, str) else ""))
                if cache is not None:
                    cache.add_many(recs)
                else:
                    for b, pid, s, text in recs:
                        memory[(b, pid, s)] = text
                if bar is not None:
                    bar.update(len(recs))
    finally:
        if bar is not None:
            bar.close()
    gen_seconds = time.perf_counter() - t_gen

    metrics, per_problem, seconds = {}, {}, {"generation": gen_seconds}
    for b, rows in rows_by.items():
        t0 = time.perf_counter()
        outs, golds = [], []
        for i, r in enumerate(rows):
            pid = problem_id(i, r["problem"])
            for s in range(n_samples):
                outs.append(lookup(b, pid, s))
                golds.append(r["answer"])
        ok = is_correct_batch(outs, golds, timeout=timeout, last_number_fallback=last_number_fallback)
        groups = [ok[i * n_samples:(i + 1) * n_samples] for i in range(len(rows))]
        metrics[b] = benchmark_metrics(groups, ks=ks)
        per_problem[b] = [int(sum(g)) for g in groups]
        seconds[f"scoring/{b}"] = time.perf_counter() - t0
    full_settings.update(n_samples=n_samples, benchmarks=list(benchmarks), limit=limit, timeout=timeout,
                         last_number_fallback=last_number_fallback)
    return EvalResult(metrics=metrics, settings=full_settings, per_problem=per_problem, seconds=seconds)
