"""The sampling core that training and evaluation share (token mode), in no particular layer.

* :func:`generate_tokens`: the only call of ``transformers``' ``model.generate`` in creditlib:
  left-padded prompt ids in, completion ids, a mask up to the first EOS and the texts out;
* :class:`VLLMEngine`: the only vLLM engine (text and token mode, weight sync for colocated training);
* helpers: :func:`left_pad`, :func:`completion_mask_from_eos`, :func:`eos_token_ids`.

The training rollouts (:mod:`creditlib.rl.rollout`) and the evaluation generators
(:mod:`creditlib.eval.generation`) are thin adapters over this module; it imports neither of them
(torch, transformers and vLLM are imported when used). It lived in ``creditlib.eval.generation``
before 0.3; the old names there still work, with a ``DeprecationWarning``, for one release.

Real tokenizers: the pad id falls back to the EOS id when a tokenizer has none (pad == EOS is
common, e.g. SmolLM2's ``<|im_end|>``); the completion mask is computed from the EOS ids, never from
the pad id, so a pad token equal to EOS cannot hide a real token.
"""

from __future__ import annotations

import os
from typing import Any, List, NamedTuple, Optional, Sequence

__all__ = ["TokenGeneration", "generate_tokens", "left_pad", "completion_mask_from_eos", "eos_token_ids",
           "pad_token_id", "VLLMEngine"]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (ValueError if neither)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token; "
                         "set tokenizer.pad_token before sampling")
    return int(pad)


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
    pad = pad_token_id(tokenizer)
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
        pad = pad_token_id(self.tokenizer)
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
