"""Rollouts: sample G completions per prompt in token mode.

* :class:`HFRollout`: ``transformers`` ``generate`` (any causal LM; under FSDP with ``synced_gpus``).
* :class:`VLLMRollout`: a colocated vLLM engine (imported lazily; weights pushed after each update).

Both return a :class:`RolloutBatch` of token ids and masks. Old log-probs are recomputed by the
trainer's own forward pass (:func:`creditlib.rl.model.completion_logprobs`), so the importance
ratio compares like with like whatever engine sampled the tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import torch

from .model import NonFiniteError

__all__ = ["RolloutBatch", "HFRollout", "VLLMRollout", "completion_mask_from_eos", "left_pad"]


@dataclass
class RolloutBatch:
    """``B = prompts x G`` completions; rows ``[k*G, (k+1)*G)`` share prompt ``k``."""

    prompt_ids: torch.Tensor       # [B, P] long, left padded
    prompt_mask: torch.Tensor      # [B, P] long (1 = real token)
    completion_ids: torch.Tensor   # [B, T] long (pad after EOS)
    completion_mask: torch.Tensor  # [B, T] bool (True = generated token, EOS included)
    texts: List[str] = field(default_factory=list)  # decoded completions (special tokens skipped)
    group_size: int = 1

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """Rows ``idx`` (for minibatches); ``texts`` follow."""
        il = idx.tolist()
        return replace(self, prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
                       completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
                       texts=[self.texts[i] for i in il] if self.texts else [])


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Left-pad token lists into ``ids [N, P]`` and ``mask [N, P]`` (long)."""
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


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """``[B, T]`` bool: True up to and including the first EOS of each row (all True if none)."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)  # [B, T]
    for e in eos_ids:
        is_eos |= completion_ids == e
    after = (is_eos.to(torch.int32).cumsum(-1) - is_eos.to(torch.int32)) > 0  # [B, T] strictly after the first EOS
    return ~after


def _eos_list(tokenizer, model=None) -> List[int]:
    ids = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tokenizer.eos_token_id, cfg_eos):
        if e is None:
            continue
        ids.extend(e if isinstance(e, (list, tuple)) else [e])
    return sorted(set(int(i) for i in ids))


class _FiniteCheck:
    """Logits processor that stops generation on NaN / +inf scores (a diverged policy) with a clear error
    instead of ``torch.multinomial``'s opaque one. ``-inf`` is allowed (top-p / masking produce it)."""

    def __call__(self, input_ids, scores):
        if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
            raise NonFiniteError("the policy produced NaN/inf logits during the rollout (diverged weights)")
        return scores


class HFRollout:
    """Sampling with ``model.generate`` in token mode.

    Args:
        model: a ``transformers`` causal LM (plain or FSDP2-sharded).
        tokenizer: its tokenizer (pad / EOS ids, decoding).
        max_new_tokens: completion length cap ``T``.
        temperature, top_p: sampling parameters (``top_k`` is off so log-probs match the sampler).
        synced: pass ``synced_gpus=True`` (required under FSDP: every rank must run the same
            number of forward passes even when its sequences finish early).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 synced: bool = False):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.synced = max_new_tokens, temperature, top_p, synced
        self.eos_ids = _eos_list(tokenizer, getattr(model, "module", model))

    def _gen_config(self, greedy: bool, max_new_tokens: Optional[int] = None):
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.eos_ids, use_cache=True)
        if greedy:
            return GenerationConfig(do_sample=False, **kw)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0, **kw)

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, greedy: bool = False,
                max_new_tokens: Optional[int] = None) -> RolloutBatch:
        """Sample ``n`` completions for each of the ``K`` prompts: ``[K, P]`` -> batch of ``B = K * n``."""
        was_training = self.model.training
        self.model.eval()
        try:
            ids = prompt_ids.repeat_interleave(n, dim=0)  # [B, P]
            mask = prompt_mask.repeat_interleave(n, dim=0)  # [B, P]
            from transformers import LogitsProcessorList

            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=self._gen_config(greedy, max_new_tokens),
                                      logits_processor=LogitsProcessorList([_FiniteCheck()]),
                                      synced_gpus=self.synced)  # [B, P + T']
        finally:
            self.model.train(was_training)
        comp = out[:, ids.shape[1]:]  # [B, T']
        if comp.shape[1] == 0:  # every sequence ended at once (cannot happen with max_new_tokens >= 1)
            comp = torch.full((ids.shape[0], 1), self.tokenizer.pad_token_id, dtype=torch.long, device=ids.device)
        cmask = completion_mask_from_eos(comp, self.eos_ids)  # [B, T']
        comp = torch.where(cmask, comp, torch.full_like(comp, self.tokenizer.pad_token_id))  # [B, T']
        texts = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
        return RolloutBatch(ids, mask, comp, cmask, texts, n)

    def generate(self, prompts: List[str], n: int = 1, *, greedy: bool = False,
                 max_new_tokens: Optional[int] = None) -> List[List[str]]:
        """Text in, ``n`` completions per prompt out (prompts are tokenized as given)."""
        enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        dev = next(self.model.parameters()).device
        ids, mask = left_pad(enc, self.tokenizer.pad_token_id, dev)
        b = self.rollout(ids, mask, n, greedy=greedy, max_new_tokens=max_new_tokens)
        return [b.texts[i * n:(i + 1) * n] for i in range(len(prompts))]


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


class VLLMRollout:
    """A colocated vLLM engine: text generation for evaluation and token-mode rollouts for training.

    The engine lives in this process (``distributed_executor_backend="external_launcher"``, the
    layout TRL's colocate mode uses), so under ``torchrun`` every rank owns one engine for its own
    prompts. After each optimizer update call :meth:`sync_weights` to load the policy's current
    weights into the engine. vLLM is imported here, lazily: importing ``creditlib.rl`` never needs it.

    Args:
        model: hub name or local path of the model the engine loads first.
        tokenizer: optional tokenizer (decoding token-mode rollouts; loaded from ``model`` if absent).
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

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, greedy: bool = False,
                max_new_tokens: Optional[int] = None) -> RolloutBatch:
        """Token mode: ``[K, P]`` left-padded prompts -> a :class:`RolloutBatch` of ``K * n`` completions."""
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
        return RolloutBatch(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), comp.to(dev),
                            cmask.to(dev), texts, n)

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

    @torch.no_grad()
    def sync_weights(self, state_dict) -> None:  # noqa: D401
        """Load the policy's weights (``{name: tensor}``, full tensors) into the engine; clear its prefix cache."""
        target = self._engine_model()
        target.load_weights(((k, v) for k, v in state_dict.items()))
        self.llm.reset_prefix_cache()
