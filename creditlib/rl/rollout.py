"""Rollouts: sample G completions per prompt in token mode.

* :class:`HFRollout`: ``transformers`` ``generate`` (any causal LM; under FSDP with ``synced_gpus``).
* :class:`VLLMRollout`: a colocated vLLM engine (imported lazily; weights pushed after each update).

Both return a :class:`RolloutBatch` of token ids and masks. Old log-probs are recomputed by the
trainer's own forward pass (:func:`creditlib.rl.model.completion_logprobs`), so the importance
ratio compares like with like whatever engine sampled the tokens.

Both are thin adapters over the shared sampling core (:func:`creditlib.generation.generate_tokens`,
:class:`creditlib.generation.VLLMEngine`): one ``model.generate`` call and one vLLM engine serve
evaluation and training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

from ..generation import VLLMEngine, completion_mask_from_eos, eos_token_ids, generate_tokens, left_pad, pad_token_id
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
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "module", model))

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, greedy: bool = False,
                max_new_tokens: Optional[int] = None) -> RolloutBatch:
        """Sample ``n`` completions for each of the ``K`` prompts: ``[K, P]`` -> batch of ``B = K * n``."""
        g = generate_tokens(self.model, self.tokenizer, prompt_ids, prompt_mask, n,
                            max_new_tokens=max_new_tokens or self.max_new_tokens, greedy=greedy,
                            temperature=self.temperature, top_p=self.top_p, eos_ids=self.eos_ids,
                            synced=self.synced, logits_processors=[_FiniteCheck()])
        return RolloutBatch(*g, group_size=n)  # prompt/completion ids [B, P] / [B, T], masks, texts

    def generate(self, prompts: List[str], n: int = 1, *, greedy: bool = False,
                 max_new_tokens: Optional[int] = None) -> List[List[str]]:
        """Text in, ``n`` completions per prompt out (prompts are tokenized as given)."""
        enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        dev = next(self.model.parameters()).device
        ids, mask = left_pad(enc, pad_token_id(self.tokenizer), dev)  # [K, P]
        b = self.rollout(ids, mask, n, greedy=greedy, max_new_tokens=max_new_tokens)
        return [b.texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMRollout(VLLMEngine):
    """A colocated vLLM engine (:class:`creditlib.generation.VLLMEngine`: ``generate``,
    ``sync_weights``) with token-mode rollouts as :class:`RolloutBatch`."""

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, greedy: bool = False,
                max_new_tokens: Optional[int] = None) -> RolloutBatch:
        """Token mode: ``[K, P]`` left-padded prompts -> a :class:`RolloutBatch` of ``K * n`` completions."""
        g = self.generate_tokens(prompt_ids, prompt_mask, n, greedy=greedy, max_new_tokens=max_new_tokens)
        return RolloutBatch(*g, group_size=n)
