"""Loaders for the math benchmarks of the GRPO-lambda paper (and GSM8K).

Every benchmark comes out as a :class:`datasets.Dataset` with the same two leading columns,
``problem`` (the question text) and ``answer`` (the gold final answer as a string, LaTeX or
plain), followed by the publisher's own fields (``solution``, ``level``, ``final_answer``, ...).
Where the answer lives differs per publisher:

============== ============================ ==============================================
name           Hub id (config, split)       answer comes from
============== ============================ ==============================================
gsm8k          openai/gsm8k (main, test)    text after ``####`` in ``answer`` (kept as
                                            ``solution``)
math500        HuggingFaceH4/MATH-500 (test) ``answer``
aime24         HuggingFaceH4/aime_2024       ``answer`` (an integer string, e.g. "025")
               (train)
amc23          math-ai/amc23 (test)         ``answer`` (a float such as 27.0 -> "27")
minerva_math   svc-huggingface/minerva-math  last ``\\boxed{}`` of ``solution`` (or
               (test)                       ``answer`` where a copy provides one)
olympiadbench  Hothan/OlympiadBench          ``final_answer`` (a list of LaTeX strings,
               (OE_TO_maths_en_COMP, train) ``$`` removed, joined with ", ")
============== ============================ ==============================================

``load_benchmark(name, path=...)`` reads a local JSONL/JSON/Parquet file in the publisher's
format instead (for example the files the Qwen2.5-Math evaluation packages); the same
normalisation applies, so the hub copy and a local copy give the same columns.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .extract import last_boxed

__all__ = ["BENCHMARKS", "BenchmarkSpec", "load_benchmark", "normalize_row", "read_rows", "reference_solution",
           "gold_output"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the Hugging Face Hub and how to normalise its rows."""

    name: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    local_file: str  # file name inside a data folder laid out as <dir>/<name>/<local_file>


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec("gsm8k", "openai/gsm8k", "main", "test", "test.jsonl"),
    "math500": BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", None, "test", "test.jsonl"),
    "aime24": BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", "test.jsonl"),
    "amc23": BenchmarkSpec("amc23", "math-ai/amc23", None, "test", "test.jsonl"),
    "minerva_math": BenchmarkSpec("minerva_math", "svc-huggingface/minerva-math", None, "test", "test.jsonl"),
    "olympiadbench": BenchmarkSpec(
        "olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "test.jsonl"
    ),
}


_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _check_name(name: str) -> BenchmarkSpec:
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise ValueError(f"name must be one of {sorted(BENCHMARKS)}, got {name!r}")
    return BENCHMARKS[name]


def _first(row: dict, *keys: str) -> Any:
    for k in keys:
        v = row.get(k)
        if v is not None and v != "":
            return v
    return None


def _answer_to_str(v: Any) -> str | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (list, tuple)):
        parts = [_answer_to_str(x) for x in v]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    s = _DOLLAR_RE.sub("", str(v)).strip()  # math delimiters go; an escaped \\$ (currency) stays
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s or None


def _gsm8k_answer(solution: str) -> str | None:
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "") or None


def normalize_row(name: str, row: dict) -> dict:
    """One publisher row -> a row with ``problem`` and ``answer`` first, then the source fields.

    Raises ``ValueError`` (naming the benchmark and the fields it has) when no problem or no
    answer can be found in the row.
    """
    spec = _check_name(name)
    out: dict[str, Any] = {}
    src = dict(row)
    if spec.name == "gsm8k":
        problem = _first(src, "question", "problem")
        solution = src.pop("answer", None)
        answer = _gsm8k_answer(solution) if isinstance(solution, str) else None
        src["solution"] = solution
    elif spec.name == "minerva_math":
        problem = _first(src, "problem", "question")
        answer = _answer_to_str(src.get("answer"))
        if answer is None and isinstance(src.get("solution"), str):
            answer = _answer_to_str(last_boxed(src["solution"]))
    elif spec.name == "olympiadbench":
        problem = _first(src, "question", "problem")
        if src.get("context"):
            problem = f"{src['context']}\n\n{problem}"
        answer = _answer_to_str(_first(src, "final_answer", "answer"))
    else:  # math500, aime24, amc23
        problem = _first(src, "problem", "question", "Problem")
        answer = _answer_to_str(_first(src, "answer", "Answer"))
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{name}: row has no problem text (fields: {sorted(row)})")
    if answer is None:
        raise ValueError(f"{name}: row has no gold answer (fields: {sorted(row)})")
    out["problem"] = problem
    out["answer"] = answer
    for k, v in src.items():
        if k in ("problem", "answer"):
            if k == "answer":
                out["source_answer"] = v if not isinstance(v, float) else repr(v)
            continue
        out[k] = v
    return out


def _json_lines(path: str, text: str | None = None) -> list[dict]:
    """Rows of a JSON-lines file; a malformed line is a ``ValueError`` naming the file and line."""
    rows = []
    lines = text.splitlines() if text is not None else open(path, encoding="utf-8")
    try:
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} holds a JSON {type(row).__name__}, expected an object (one row)")
            rows.append(row)
    finally:
        if text is None:
            lines.close()
    return rows


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a local ``.jsonl`` / ``.json`` / ``.parquet`` file, as dicts.

    One loader for the evaluator and the recipes. A malformed JSON line (or a row that is not an
    object) is a ``ValueError`` naming the file and the line number; a missing file or another
    suffix is a ``ValueError`` too.
    """
    path = os.fspath(path)
    low = path.lower()
    if not low.endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"path must be a .jsonl, .json or .parquet file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} does not exist (expected a local JSONL/JSON/Parquet file)")
    if low.endswith(".jsonl"):
        return _json_lines(path)
    if low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON lines saved with a .json suffix
            return _json_lines(path, text)
        if isinstance(data, dict):
            for key in ("data", "rows", "test", "train"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
            else:
                data = next((v for v in data.values() if isinstance(v, list)), data)
        if not isinstance(data, list):
            raise ValueError(f"path {path!r}: expected a JSON list of rows or JSON lines")
        return data
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _resolve_path(spec: BenchmarkSpec, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for cand in (os.path.join(path, spec.name, spec.local_file), os.path.join(path, spec.local_file)):
            if os.path.isfile(cand):
                return cand
        raise ValueError(
            f"path {path!r} is a folder without {spec.name}/{spec.local_file} or {spec.local_file}"
        )
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} does not exist (expected a local JSONL/JSON/Parquet file)")
    return path


def _to_dataset(name: str, rows: list[dict], where: str):
    import datasets

    if not rows:
        raise ValueError(f"{name}: no rows in {where}")
    norm = [normalize_row(name, r) for r in rows]
    # Columns can hold None in some rows and values in others (OlympiadBench `unit`); build the
    # table from the union of keys so every row has every column.
    keys: list[str] = []
    for r in norm:
        for k in r:
            if k not in keys:
                keys.append(k)
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in norm])


def load_benchmark(name: str, path: str | os.PathLike | None = None, split: str | None = None):
    """Load a math benchmark as a :class:`datasets.Dataset` with ``problem`` and ``answer``.

    Args:
        name: one of ``gsm8k``, ``math500``, ``aime24``, ``amc23``, ``minerva_math``,
            ``olympiadbench``.
        path: a local ``.jsonl``/``.json``/``.parquet`` file in the publisher's format, or a
            folder holding ``<name>/test.jsonl``. ``None`` loads from the Hugging Face Hub (see
            :data:`BENCHMARKS` for the ids).
        split: Hub split to load (default: the benchmark's evaluation split). Ignored with
            ``path``.

    Returns:
        A ``datasets.Dataset``; ``answer`` is a string; the publisher's other fields follow
        (a publisher field named ``answer`` that is not the bare answer is kept under another
        name: GSM8K's worked answer becomes ``solution``, and the raw value under
        ``source_answer``).

    Raises:
        ValueError: unknown ``name``, a missing/unsupported ``path``, rows without a problem or
            answer.
        RuntimeError: the Hub could not be reached (the message says how to load offline).
    """
    spec = _check_name(name)
    if path is not None:
        file = _resolve_path(spec, path)
        return _to_dataset(name, read_rows(file), file)
    import datasets

    split = split or spec.hub_split
    try:
        if spec.hub_config is not None:
            ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
        else:
            ds = datasets.load_dataset(spec.hub_id, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load benchmark {name!r} from the Hugging Face Hub "
            f"({spec.hub_id}{', ' + spec.hub_config if spec.hub_config else ''}, split {split!r}): "
            f"{type(e).__name__}: {e}. If this machine is offline (HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE) or the Hub is unreachable, pass path= a local JSONL/Parquet "
            f"file in the publisher's format, e.g. load_benchmark({name!r}, path='data/{name}/test.jsonl')."
        ) from e
    return _to_dataset(name, list(ds), f"{spec.hub_id}[{split}]")


def reference_solution(name: str, row: dict) -> str | None:
    """The publisher's worked solution for a normalised ``row`` when it marks its final answer
    in a way extraction can find (GSM8K ``####``, ``\\boxed{}`` in MATH-500, Minerva and AIME
    solutions); ``None`` when the benchmark has no such text (AMC23, OlympiadBench, whose
    solutions end in prose). Used by the self-consistency check and the oracle generator."""
    _check_name(name)
    sol = row.get("solution")
    if isinstance(sol, list):
        sol = sol[-1] if sol else None
    if not isinstance(sol, str) or not sol.strip():
        return None
    if name == "gsm8k":
        return sol if "####" in sol else None
    if name == "olympiadbench":
        return None
    if any(cmd in sol for cmd in ("\\boxed", "\\fbox", "\\framebox")):
        return sol
    return None


def gold_output(name: str, row: dict) -> str:
    """A model-style output that states the gold answer: the publisher's solution where
    :func:`reference_solution` finds one, else ``"... The final answer is $\\boxed{answer}$."``."""
    sol = reference_solution(name, row)
    if sol is not None:
        return sol
    return f"The final answer is $\\boxed{{{row['answer']}}}$."

