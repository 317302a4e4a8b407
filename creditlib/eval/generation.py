"""Text generators for evaluation, and the one sampling core the training rollouts share.

A generator is anything with ``generate(prompts: list[str], n: int) -> list[list[str]]``:
``n`` completions (text only, without the prompt) for each prompt, in order. Three are here:

* :class:`HFGenerator`: ``transformers`` ``generate``, batched, left-padded, with the
  tokenizer's chat template when it has one;
* :class:`VLLMGenerator`: a :class:`VLLMEngine` (vLLM, imported lazily) with the same chat
  templating;
* :class:`OracleGenerator`: answers every known problem with its gold solution. It is a real
  generator (an oracle), used to check that scoring reaches 1.0 end to end.

All of them sample through the token-mode core in :mod:`creditlib.generation` (``generate_tokens``,
the only ``model.generate`` call, and ``VLLMEngine``), which the training rollouts share. Those
names were defined here before 0.3: ``creditlib.eval.generation.generate_tokens`` and the other
moved names still work for one release, with a ``DeprecationWarning``.

Layering: ``creditlib.eval`` never imports ``creditlib.rl``.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Protocol, Sequence, runtime_checkable

from .. import generation as _core  # the token-mode sampling core (generate_tokens, VLLMEngine)

__all__ = [
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "OracleGenerator",
    "DEFAULT_PROMPT",
    "build_prompt",
    "apply_chat_template",
]

#: Names that moved to :mod:`creditlib.generation` in 0.3 (still importable from here, with a warning).
_MOVED = ("TokenGeneration", "generate_tokens", "left_pad", "completion_mask_from_eos", "eos_token_ids",
          "VLLMEngine", "_vllm_import")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"creditlib.eval.generation.{name} moved to creditlib.generation.{name}; the old name "
                      "will be removed in creditlib 0.4", DeprecationWarning, stacklevel=2)
        from .. import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Default instruction (the Qwen2.5-Math / DeepSeek-R1 evaluation wording).
DEFAULT_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def build_prompt(problem: str, template: str = DEFAULT_PROMPT) -> str:
    """The user message for ``problem`` (``template`` has a ``{problem}`` field)."""
    if "{problem}" not in template:
        raise ValueError(f"template must contain '{{problem}}', got {template!r}")
    return template.format(problem=problem)


@runtime_checkable
class Generator(Protocol):
    """``generate(prompts, n)`` -> for each prompt, ``n`` completion strings."""

    def generate(self, prompts: list[str], n: int) -> list[list[str]]: ...


def apply_chat_template(tokenizer, message: str, system_prompt: str | None = None) -> str:
    """``message`` as a one-turn chat prompt with the generation prompt appended, if the
    tokenizer has a chat template; otherwise ``message`` unchanged."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": message}
        ]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return message if not system_prompt else f"{system_prompt}\n\n{message}"


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def _check_n(prompts, n) -> None:
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


# ----------------------------------------------------------------------------- text generators
class HFGenerator:
    """Sampling with a ``transformers`` causal LM (through :func:`generate_tokens`).

    Args:
        model: a causal LM instance, or a hub name / local path (loaded with
            ``AutoModelForCausalLM``; ``dtype`` and ``device`` apply).
        tokenizer: its tokenizer (loaded from ``model`` when it is a path and this is None).
        temperature: 0 = greedy (then ``n > 1`` repeats the same completion).
        top_p, max_new_tokens: sampling parameters.
        batch_size: prompts per ``generate`` call (each expands to ``n`` sequences).
        system_prompt: optional system message for the chat template.
        seed: seeds torch before each call, for reproducible sampling.
    """

    def __init__(self, model, tokenizer=None, *, temperature: float = 0.6, top_p: float = 0.95,
                 max_new_tokens: int = 1024, batch_size: int = 8, system_prompt: str | None = None,
                 seed: int | None = 0, dtype: str = "auto", device: str | None = None):
        _check_sampling(temperature, top_p, max_new_tokens)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(model, str):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = model.to(device)
        elif device is not None:
            model = model.to(device)
        if tokenizer is None:
            raise ValueError("tokenizer must be given when model is a model instance")
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.temperature, self.top_p, self.max_new_tokens = float(temperature), float(top_p), max_new_tokens
        self.batch_size, self.system_prompt, self.seed = batch_size, system_prompt, seed

    def generate(self, prompts: list[str], n: int) -> list[list[str]]:
        """``n`` completions per prompt (chat-templated when the tokenizer has a template)."""
        import torch

        _check_n(prompts, n)
        tok, model = self.tokenizer, self.model
        out: list[list[str]] = []
        device = next(model.parameters()).device
        greedy = self.temperature == 0
        has_bos = bool(getattr(tok, "chat_template", None))  # templates write their own special tokens
        for start in range(0, len(prompts), self.batch_size):
            chunk = [apply_chat_template(tok, p, self.system_prompt) for p in prompts[start:start + self.batch_size]]
            ids, mask = _core.left_pad([tok(c, add_special_tokens=not has_bos)["input_ids"] for c in chunk],
                                       _core.pad_token_id(tok), device)  # [b, P]
            if self.seed is not None:
                torch.manual_seed(self.seed + start)
            per = 1 if greedy else n
            g = _core.generate_tokens(model, tok, ids, mask, per, max_new_tokens=self.max_new_tokens, greedy=greedy,
                                temperature=self.temperature, top_p=self.top_p)
            for i in range(len(chunk)):
                got = g.texts[i * per:(i + 1) * per]
                out.append(got * n if greedy else got)
        return out


class VLLMGenerator:
    """A :class:`VLLMEngine` as a :class:`Generator` (chat template applied here).

    Imports vLLM only when built; raises ``ImportError`` with install instructions when vLLM is
    missing.
    """

    def __init__(self, model: str, *, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 1024,
                 system_prompt: str | None = None, seed: int = 0, **engine_kwargs):
        _check_sampling(temperature, top_p, max_new_tokens)
        self.engine = _core.VLLMEngine(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.system_prompt = system_prompt

    def generate(self, prompts: list[str], n: int) -> list[list[str]]:
        _check_n(prompts, n)
        chat = [apply_chat_template(self.tokenizer, p, self.system_prompt) for p in prompts]
        return self.engine.generate(chat, n)


class OracleGenerator:
    """Answers each prompt with the gold solution of the problem it contains.

    Args:
        solutions: ``{problem text: solution text}``. A prompt is answered with the solution of
            the longest problem text it contains; a prompt containing none gets ``""`` (which
            scores as wrong).
    """

    def __init__(self, solutions: Mapping[str, str]):
        if not isinstance(solutions, Mapping) or not solutions:
            raise ValueError("solutions must be a non-empty mapping from problem text to solution text")
        self._by_len = sorted(solutions.items(), key=lambda kv: -len(kv[0]))

    @classmethod
    def from_datasets(cls, benchmarks: Mapping[str, Sequence[dict]]) -> "OracleGenerator":
        """An oracle for normalised benchmark rows: each problem answered with
        :func:`creditlib.eval.data.gold_output` (the worked solution, or the boxed answer)."""
        from .data import gold_output

        sols = {}
        for name, rows in benchmarks.items():
            for r in rows:
                sols[r["problem"]] = gold_output(name, r)
        return cls(sols)

    def generate(self, prompts: list[str], n: int) -> list[list[str]]:
        _check_n(prompts, n)
        out = []
        for p in prompts:
            sol = next((s for prob, s in self._by_len if prob in p), "")
            out.append([sol] * n)
        return out
