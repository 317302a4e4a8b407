"""Prompt sources with a single-integer data position (what a checkpoint stores to resume).

* :class:`SyntheticSource`: the embedded chain task (:mod:`creditlib.rl.task`), or any task with
  its interface (``problem / heldout / train``, ``completion_length``).
* :class:`MathSource`: GSM8K / MATH / a local JSONL-JSON-Parquet file, formatted with the model's
  chat template, rewarded by ``creditlib.eval.rewards.accuracy_reward``.

Which source a ``--dataset`` value builds is decided in one place, the registry
(:mod:`creditlib.rl.registry`, whose built-in builders make the sources defined here);
:func:`creditlib.rl.registry.build_source` looks it up. This module does not import the registry
at import time (no cycle); :func:`build_source` here is a call-time alias of the registry's. Files and the Hub benchmarks are
read through the evaluation package (:func:`creditlib.eval.data.read_rows`,
:func:`creditlib.eval.load_benchmark`): ``rl`` builds on ``eval``, never the other way round.

Both give ``Example(prompt, answer, solution)`` lists: ``next_batch(position, k)`` for training
(an endless, seeded, epoch-shuffled stream), ``heldout(n)`` for evaluation and ``validation(n)``
for the warm-up's early stop. ``encode(examples)`` gives left-padded ``ids, mask`` ``[K, P]``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..eval.data import read_rows
from ..eval.extract import last_boxed
from ..generation import left_pad, pad_token_id

__all__ = ["Example", "SyntheticSource", "MathSource", "build_source", "normalize_math_row"]


@dataclass(frozen=True)
class Example:
    prompt: str                      # formatted prompt text (chat template applied where used)
    answer: str                      # gold final answer
    solution: Optional[str] = None   # worked solution (for the supervised warm-up), if any


class _Source:
    tokenizer = None
    add_special_tokens = True

    def encode(self, examples: List[Example], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ``ids, mask``: ``[K, P]`` long."""
        enc = [self.tokenizer(e.prompt, add_special_tokens=self.add_special_tokens)["input_ids"] for e in examples]
        return left_pad(enc, pad_token_id(self.tokenizer), device)

    def encode_sft(self, examples: List[Example], device=None):
        """``ids [K, L]`` (prompt + solution + EOS, right padded), ``attn [K, L]``, ``labels [K, L]``
        (-100 on the prompt and the padding: the loss covers the solution and its EOS only)."""
        rows, labs = [], []
        for e in examples:
            if e.solution is None:
                raise ValueError("supervised warm-up needs a 'solution' for every example (set --sft-steps 0)")
            p = self.tokenizer(e.prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
            s = self.tokenizer(e.solution, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(p + s)
            labs.append([-100] * len(p) + s)
        return pad_sft_rows(rows, labs, pad_token_id(self.tokenizer), device)


def pad_sft_rows(rows: List[List[int]], labels: List[List[int]], pad_id: int, device=None):
    """Right-pad supervised rows: ``ids [K, L]`` (``pad_id``), ``attn [K, L]`` (1 on real tokens) and
    ``labels [K, L]`` (-100 on the padding), from token lists and their label lists."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [K, L]
    attn = torch.zeros((len(rows), L), dtype=torch.long)  # [K, L]
    out = torch.full((len(rows), L), -100, dtype=torch.long)  # [K, L]
    for i, (r, lab) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.as_tensor(r)
        attn[i, :len(r)] = 1
        out[i, :len(r)] = torch.as_tensor(lab)
    return ids.to(device), attn.to(device), out.to(device)


class SyntheticSource(_Source):
    """The embedded dial-walk task (held-out ``test`` and ``val`` splits never trained on)."""

    def __init__(self, task, tokenizer):
        self.task, self.tokenizer = task, tokenizer

    @property
    def max_new_tokens(self) -> int:
        return self.task.completion_length

    def _ex(self, p) -> Example:
        return Example(p.prompt, p.answer, p.solution)

    def next_batch(self, position: int, k: int) -> Tuple[List[Example], int]:
        probs, nxt = self.task.train(position, k)
        return [self._ex(p) for p in probs], nxt

    def heldout(self, n: int) -> List[Example]:
        return [self._ex(p) for p in self.task.heldout("test", n)]

    def validation(self, n: int) -> List[Example]:
        return [self._ex(p) for p in self.task.heldout("val", n)]


def _answer_str(v) -> Optional[str]:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (list, tuple)):
        parts = [p for p in (_answer_str(x) for x in v) if p]
        return ", ".join(parts) if parts else None
    s = str(v).replace("$", "").strip()
    return s or None


def normalize_math_row(row: dict) -> dict:
    """Any math row -> ``{"problem", "answer", "solution"}``.

    problem: ``problem`` / ``question`` / ``prompt``; answer: ``answer`` (text after ``####`` when it
    is a GSM8K worked answer), ``final_answer``, or the last ``\\boxed{}`` of ``solution``.
    """
    problem = next((row[k] for k in ("problem", "question", "prompt", "Problem") if isinstance(row.get(k), str)
                    and row[k].strip()), None)
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    raw = row.get("answer")
    answer = None
    if isinstance(raw, str) and "####" in raw:
        solution = solution or raw
        answer = raw.rsplit("####", 1)[1].strip().replace(",", "")
    elif raw is not None:
        answer = _answer_str(raw)
    if answer is None and row.get("final_answer") is not None:
        answer = _answer_str(row["final_answer"])
    if answer is None and solution:
        answer = last_boxed(solution)
    if problem is None or not answer:
        raise ValueError(f"math row needs a problem (problem/question/prompt) and an answer "
                         f"(answer/final_answer/boxed solution); fields present: {sorted(row)}")
    if solution is not None and "####" in solution:  # GSM8K style -> a boxed final line the reward can read
        body, ans = solution.rsplit("####", 1)
        solution = f"{body.strip()}\nThe final answer is $\\boxed{{{ans.strip()}}}$."
    return {"problem": problem, "answer": answer, "solution": solution}


def _read_rows(path: str) -> List[dict]:
    if not path.lower().endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"dataset path {path!r} must end in .jsonl, .json or .parquet")
    if not os.path.isfile(path):
        raise ValueError(f"dataset path {path!r} does not exist (expected .jsonl, .json or .parquet)")
    return read_rows(path)  # a malformed JSON line: ValueError naming the file and the line


def _hub_error(what: str, flag: str, e: Exception) -> RuntimeError:
    return RuntimeError(f"could not load {what} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:300]}). "
                        f"Offline or behind a firewall? Pass the recipe flag {flag} FILE with a local "
                        f".jsonl/.json/.parquet copy (fields: problem/question and answer; a worked "
                        f"'solution' for the warm-up).")


def _load_rows(spec: str, train: bool) -> List[dict]:
    """Rows for ``gsm8k`` / ``math`` (hub, through creditlib.eval) or a local file."""
    flag = "--dataset" if train else "--eval-dataset"
    if spec in ("gsm8k", "math"):
        from ..eval import load_benchmark

        if spec == "gsm8k":
            try:
                ds = load_benchmark("gsm8k", split="train" if train else None)
            except RuntimeError as e:
                raise _hub_error(f"GSM8K ({'train' if train else 'test'} split)", flag, e) from e
            return [normalize_math_row({"problem": r["problem"], "answer": r["answer"],
                                        "solution": r.get("solution")}) for r in ds]
        if not train:
            try:
                return [normalize_math_row(dict(r)) for r in load_benchmark("math500")]
            except RuntimeError as e:
                raise _hub_error("MATH500 (the held-out set of --dataset math)", flag, e) from e
        try:  # the MATH training split (Hendrycks et al.)
            import datasets

            ds = datasets.load_dataset("DigitalLearningGmbH/MATH-lighteval", split="train")
        except Exception as e:  # noqa: BLE001 - any hub / network failure
            raise _hub_error("the MATH training split", flag, e) from e
        return [normalize_math_row(dict(r)) for r in ds]
    if not spec.lower().endswith((".jsonl", ".json", ".parquet")):
        close = difflib.get_close_matches(spec, ["gsm8k", "math"], n=1)
        raise ValueError(f"{flag} {spec!r}: expected 'gsm8k', 'math' or a local .jsonl/.json/.parquet file"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    rows = _read_rows(spec)
    out = []
    for i, r in enumerate(rows):
        try:
            out.append(normalize_math_row(r))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{spec}: row {i + 1}: {e}") from None
    return out


class MathSource(_Source):
    """Math word problems for the real path.

    Args:
        dataset: ``gsm8k``, ``math`` or a local file (see :func:`normalize_math_row` for its fields).
        tokenizer: the policy's tokenizer.
        eval_dataset: held-out set (same forms); empty = the test split of ``dataset``, or for a local
            file the last ``eval_size`` rows of a seeded shuffle (removed from training).
        chat: ``"auto"`` / ``"on"`` / ``"off"``: wrap the problem in the tokenizer's chat template.
        instruction: appended to every problem.
        max_prompt_length: prompts longer than this (tokens) are dropped.
        seed: seed of the epoch shuffles.
        eval_size: size of the held-out slice taken from a local file when ``eval_dataset`` is empty.
    """

    def __init__(self, dataset: str, tokenizer, *, eval_dataset: str = "", chat: str = "auto",
                 instruction: str = "", max_prompt_length: int = 512, seed: int = 0, eval_size: int = 512,
                 val_size: int = 64):
        self.tokenizer, self.seed, self.instruction = tokenizer, int(seed), instruction
        use_chat = chat == "on" or (chat == "auto" and getattr(tokenizer, "chat_template", None))
        if chat == "on" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template='on' but the tokenizer has no chat template")
        self.chat = bool(use_chat)
        self.add_special_tokens = not self.chat  # the template carries its own BOS
        rows = _load_rows(dataset, train=True)
        if eval_dataset:
            held = _load_rows(eval_dataset, train=False)
        elif dataset in ("gsm8k", "math"):
            held = _load_rows(dataset, train=False)
        else:  # a local file: hold out a seeded slice
            order = np.random.default_rng([self.seed, 7]).permutation(len(rows))
            n_held = min(eval_size + val_size, len(rows) // 2)
            held = [rows[i] for i in order[:n_held]]
            rows = [rows[i] for i in order[n_held:]]
        if not rows:
            raise ValueError(f"dataset {dataset!r}: no training rows")
        self.train_rows = rows
        self.max_prompt_length = max_prompt_length
        self.held_rows = held
        self.val_rows = held[-val_size:] if len(held) > val_size else held

    def format(self, problem: str) -> str:
        text = f"{problem}\n{self.instruction}".strip() if self.instruction else problem
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Question: {text}\nAnswer:"

    def _ex(self, r: dict) -> Example:
        return Example(self.format(r["problem"]), r["answer"], r.get("solution"))

    def _too_long(self, e: Example) -> bool:
        return len(self.tokenizer(e.prompt, add_special_tokens=self.add_special_tokens)["input_ids"]) > self.max_prompt_length

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows))

    def next_batch(self, position: int, k: int) -> Tuple[List[Example], int]:
        """``k`` prompts from stream position ``position`` (epoch = position // N, reshuffled per epoch)."""
        out, pos, N, skipped = [], position, len(self.train_rows), 0
        order, epoch = None, -1
        while len(out) < k:
            if pos // N != epoch:
                epoch = pos // N
                order = self._order(epoch)
            e = self._ex(self.train_rows[int(order[pos % N])])
            pos += 1
            if self._too_long(e):
                skipped += 1
                if skipped > 10 * N:
                    raise ValueError(f"no prompt fits max_prompt_length={self.max_prompt_length}")
                continue
            out.append(e)
        return out, pos

    def heldout(self, n: int) -> List[Example]:
        return [e for e in (self._ex(r) for r in self.held_rows[:n]) if not self._too_long(e)]

    def validation(self, n: int) -> List[Example]:
        return [self._ex(r) for r in self.val_rows[:n]]


def build_source(cfg, tokenizer):
    """The prompt source a :class:`~creditlib.rl.config.RecipeConfig` asks for: the registry's
    :func:`creditlib.rl.registry.build_source` (imported at call time: the registry's builders
    import this module, so a module-level import either way would be a cycle)."""
    from .registry import build_source as _build

    return _build(cfg, tokenizer)
