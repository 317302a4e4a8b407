"""Text generators for evaluation, and the one sampling core the training rollouts share.

A generator is anything with ``generate(prompts: list[str], n: int) -> list[list[str]]``:
``n`` completions (text only, without the prompt) for each prompt, in order. Three are here:

* :class:`HFGenerator`: ``transformers`` ``generate``, batched, left-padded, with the
  tokenizer's chat template when it has one;
* :class:`VLLMGenerator`: a :class:`VLLMEngine` (vLLM, imported lazily) with the same chat
  templating;
* :class:`OracleGenerator`: answers every known problem with its gold solution. It is a real
  generator (an oracle), used to check that scoring reaches 1.0 end to end.

Token mode, the layer both evaluation and training sample through:

* :func:`generate_tokens`: the only call of ``transformers``' ``model.generate`` in creditlib:
  left-padded prompt ids in, completion ids, a mask up to the first EOS and the texts out;
* :class:`VLLMEngine`: the only vLLM engine (text and token mode, weight sync for colocated training).

Layering: ``creditlib.eval`` never imports ``creditlib.rl``; the recipes' rollouts
(:mod:`creditlib.rl.rollout`) are thin adapters over :func:`generate_tokens` and :class:`VLLMEngine`.
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

__all__ = [
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "VLLMEngine",
    "OracleGenerator",
    "DEFAULT_PROMPT",
    "build_prompt",
    "apply_chat_template",
    "TokenGeneration",
    "generate_tokens",
    "left_pad",
    "completion_mask_from_eos",
    "eos_token_ids",
]

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


# ----------------------------------------------------------------------------- token mode
class TokenGeneration(NamedTuple):
    """``B = K * n`` completions of ``K`` prompts; rows ``[k*n, (k+1)*n)`` share prompt ``k``."""

    prompt_ids: Any       # [B, P] long, left padded (each prompt repeated n times)
    prompt_mask: Any      # [B, P] long (1 = real token)
    completion_ids: Any   # [B, T] long (pad after the first EOS)
    completion_mask: Any  # [B, T] bool (True up to and including the first EOS)
    texts: List[str]      # [B] decoded completions (special tokens skipped)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Left-pad token lists into ``ids [N, P]`` and ``mask [N, P]`` (long)."""
    import torch

    if len(seqs) == 0:
        raise ValueError("left_pad needs at least one sequence")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # [N, P]
    mask = torch.zeros((len(seqs), P), dtype=torch.long)  # [N, P]
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, P - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def completion_mask_from_eos(completion_ids, eos_ids: Sequence[int]):
    """``[B, T]`` bool: True up to and including the first EOS of each row (all True if none)."""
    import torch

    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)  # [B, T]
    for e in eos_ids:
        is_eos |= completion_ids == e
    after = (is_eos.to(torch.int32).cumsum(-1) - is_eos.to(torch.int32)) > 0  # [B, T] strictly after the first EOS
    return ~after


def eos_token_ids(tokenizer, model=None) -> List[int]:
    """The end-of-sequence ids: the tokenizer's and the model's generation config's (Qwen's chat
    models end turns with one and documents with another)."""
    ids = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tokenizer.eos_token_id, cfg_eos):
        if e is None:
            continue
        ids.extend(e if isinstance(e, (list, tuple)) else [e])
    return sorted(set(int(i) for i in ids))


def generate_tokens(model, tokenizer, prompt_ids, prompt_mask, n: int = 1, *, max_new_tokens: int,
                    greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    eos_ids: Optional[Sequence[int]] = None, synced: bool = False,
                    logits_processors: Sequence = ()) -> TokenGeneration:
    """Sample ``n`` completions for each of ``K`` left-padded prompts with ``model.generate``.

    Args:
        model: a ``transformers`` causal LM (plain or FSDP2-sharded); put in eval mode for the
            call and restored.
        tokenizer: its tokenizer (``pad_token_id``, decoding).
        prompt_ids, prompt_mask: ``[K, P]`` left-padded prompts.
        n: completions per prompt (rows ``[k*n, (k+1)*n)`` belong to prompt ``k``).
        max_new_tokens: completion length cap ``T``.
        greedy: argmax decoding (then ``temperature`` / ``top_p`` are unused).
        temperature, top_p: sampling parameters; ``top_k`` is off, so the sampler's distribution is
            the tempered policy (the log-probs a trainer recomputes match it).
        eos_ids: end ids (default :func:`eos_token_ids`).
        synced: ``synced_gpus=True`` (FSDP: every rank runs the same number of forward passes).
        logits_processors: extra ``transformers`` logits processors (e.g. a finite-logits check).
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = list(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer, getattr(model, "module", model))
    pad = tokenizer.pad_token_id
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True)
    gen_cfg = GenerationConfig(do_sample=False, **kw) if greedy else \
        GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **kw)
    was_training = model.training
    model.eval()
    try:
        ids = prompt_ids.repeat_interleave(n, dim=0)  # [B, P]
        mask = prompt_mask.repeat_interleave(n, dim=0)  # [B, P]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=LogitsProcessorList(list(logits_processors)),
                                 synced_gpus=synced)  # [B, P + T']
    finally:
        model.train(was_training)
    comp = out[:, ids.shape[1]:]  # [B, T']
    if comp.shape[1] == 0:  # every sequence ended at once (cannot happen with max_new_tokens >= 1)
        comp = torch.full((ids.shape[0], 1), pad, dtype=torch.long, device=ids.device)  # [B, 1]
    cmask = completion_mask_from_eos(comp, eos)  # [B, T']
    comp = torch.where(cmask, comp, torch.full_like(comp, pad))  # [B, T']
    texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
    return TokenGeneration(ids, mask, comp, cmask, texts)


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
            ids, mask = left_pad([tok(c, add_special_tokens=not has_bos)["input_ids"] for c in chunk],
                                 tok.pad_token_id, device)  # [b, P]
            if self.seed is not None:
                torch.manual_seed(self.seed + start)
            per = 1 if greedy else n
            g = generate_tokens(model, tok, ids, mask, per, max_new_tokens=self.max_new_tokens, greedy=greedy,
                                temperature=self.temperature, top_p=self.top_p)
            for i in range(len(chunk)):
                got = g.texts[i * per:(i + 1) * per]
                out.append(got * n if greedy else got)
        return out


def _vllm_import():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(
            "--rollout vllm needs the vLLM package, which is not installed. Install it on a CUDA machine with "
            "`pip install 'creditlib[vllm]'` (vLLM's official wheels are CUDA builds), or use --rollout hf."
        ) from e
    return LLM, SamplingParams


class VLLMEngine:
    """A colocated vLLM engine: text generation for evaluation and token mode for training rollouts.

    The engine lives in this process (``distributed_executor_backend="external_launcher"``, the
    layout TRL's colocate mode uses), so under ``torchrun`` every rank owns one engine for its own
    prompts. After each optimizer update call :meth:`sync_weights` to load the policy's current
    weights into the engine. vLLM is imported here, lazily: importing creditlib never needs it.

    Args:
        model: hub name or local path of the model the engine loads first.
        tokenizer: optional tokenizer (decoding token-mode output; loaded from ``model`` if absent).
        max_new_tokens, temperature, top_p: default sampling parameters.
        gpu_memory_utilization: fraction of GPU memory for the engine (leave room for training).
        dtype: ``"auto"``, ``"bfloat16"``, ... (vLLM's names).
        seed: engine seed (give each data-parallel rank a different one).
        max_model_len: context length of the engine (None = the model's).
    """

    def __init__(self, model: str, tokenizer=None, *, max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3, dtype: str = "auto", seed: int = 0,
                 max_model_len: Optional[int] = None, **llm_kwargs):
        LLM, SamplingParams = _vllm_import()
        self._SamplingParams = SamplingParams
        # in-process engine (its model object reachable for weight sync), as in TRL's colocate mode
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29533")):
            os.environ.setdefault(k, v)
        self.llm = LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, distributed_executor_backend="external_launcher",
                       enable_prefix_caching=True, **llm_kwargs)
        if tokenizer is None:
            tokenizer = self.llm.get_tokenizer()
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def _params(self, n: int, temperature: Optional[float], max_new_tokens: Optional[int]):
        t = self.temperature if temperature is None else temperature
        return self._SamplingParams(n=n, temperature=t, top_p=self.top_p if t > 0 else 1.0,
                                    max_tokens=max_new_tokens or self.max_new_tokens)

    def generate(self, prompts: List[str], n: int = 1, *, temperature: Optional[float] = None,
                 max_new_tokens: Optional[int] = None) -> List[List[str]]:
        """``n`` completions (text) per prompt string; ``temperature=0`` is greedy."""
        outs = self.llm.generate(list(prompts), sampling_params=self._params(n, temperature, max_new_tokens),
                                 use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]

    def generate_tokens(self, prompt_ids, prompt_mask, n: int, greedy: bool = False,
                        max_new_tokens: Optional[int] = None) -> TokenGeneration:
        """Token mode: ``[K, P]`` left-padded prompts -> ``K * n`` completions (see :class:`TokenGeneration`)."""
        import torch

        reqs = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        outs = self.llm.generate(reqs, sampling_params=self._params(n, 0.0 if greedy else None, max_new_tokens),
                                 use_tqdm=False)
        toks = [list(c.token_ids) or [self.tokenizer.eos_token_id] for o in outs for c in o.outputs]
        T = max(len(t) for t in toks)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        comp = torch.full((len(toks), T), pad, dtype=torch.long)  # [B, T]
        cmask = torch.zeros((len(toks), T), dtype=torch.bool)  # [B, T]
        for i, t in enumerate(toks):
            comp[i, :len(t)] = torch.as_tensor(t)
            cmask[i, :len(t)] = True
        texts = [c.text for o in outs for c in o.outputs]
        dev = prompt_ids.device
        return TokenGeneration(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0),
                               comp.to(dev), cmask.to(dev), texts)

    def _engine_model(self):
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.model_runner.model",
                     "model_executor.driver_worker.worker.model_runner.model"):
            obj = engine
            try:
                for name in path.split("."):
                    obj = getattr(obj, name)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("cannot reach the vLLM engine's model for weight sync (unsupported vLLM version); "
                           "run with VLLM_ENABLE_V1_MULTIPROCESSING=0 or use --rollout hf")

    def sync_weights(self, state_dict) -> None:
        """Load the policy's weights (``{name: tensor}``, full tensors) into the engine; clear its prefix cache."""
        import torch

        with torch.no_grad():
            target = self._engine_model()
            target.load_weights(((k, v) for k, v in state_dict.items()))
        self.llm.reset_prefix_cache()


class VLLMGenerator:
    """A :class:`VLLMEngine` as a :class:`Generator` (chat template applied here).

    Imports vLLM only when built; raises ``ImportError`` with install instructions when vLLM is
    missing.
    """

    def __init__(self, model: str, *, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 1024,
                 system_prompt: str | None = None, seed: int = 0, **engine_kwargs):
        _check_sampling(temperature, top_p, max_new_tokens)
        self.engine = VLLMEngine(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
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
