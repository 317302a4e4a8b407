"""Build the objects a recipe needs from its config: policy + tokenizer, reference, rollout engine."""

from __future__ import annotations

from typing import Optional

import torch

from .distributed import DistInfo, shard_model
from .model import load_causal_lm, resolve_dtype, tiny_qwen2
from .rollout import HFRollout, VLLMRollout

__all__ = ["build_policy", "build_reference", "build_rollout", "max_new_tokens"]


def build_policy(cfg, device: torch.device):
    """``(model, tokenizer)``: the embedded tiny Qwen2 + char tokenizer, or ``cfg.model`` from the hub/disk.

    Call under ``torch.manual_seed``: the embedded model is randomly initialised (identically on
    every rank when the seed is the same).
    """
    dtype = resolve_dtype(cfg.dtype, device)
    if not cfg.model:
        from .task import build_char_tokenizer

        tok = build_char_tokenizer()
        model = tiny_qwen2(len(tok), cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
                           max_position_embeddings=max(64, 4 * (cfg.num_ops * 2 + 8)),
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        model.to(device=device, dtype=dtype)
        return model, tok
    return load_causal_lm(cfg.model, dtype, device, cfg.attn_implementation, cfg.gradient_checkpointing)


def build_reference(cfg, device: torch.device, state_dict: dict, info: DistInfo):
    """A frozen copy of the policy with weights ``state_dict`` (full), sharded like the policy."""
    with torch.random.fork_rng(devices=[]):
        ref, _ = build_policy(cfg, device)
    ref.load_state_dict({k: v.to(device) for k, v in state_dict.items()})
    ref.requires_grad_(False)
    ref.eval()
    if cfg.gradient_checkpointing:  # transformers >= 5 renamed it; the old name warns
        (getattr(ref, "activation_checkpointing_disable", None) or ref.gradient_checkpointing_disable)()
    return shard_model(ref, info)


def max_new_tokens(cfg, source) -> int:
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    return getattr(source, "max_new_tokens", 512)


def build_rollout(cfg, model, tokenizer, source, info: DistInfo, sync: Optional[dict] = None):
    """``HFRollout`` (token-mode ``generate``; synced across ranks under FSDP) or a colocated ``VLLMRollout``."""
    T = max_new_tokens(cfg, source)
    if cfg.rollout == "hf":
        return HFRollout(model, tokenizer, T, cfg.temperature, cfg.top_p, synced=info.enabled)
    if not cfg.model:
        raise ValueError("--rollout vllm needs --model NAME_OR_PATH (the embedded model has no checkpoint vLLM can load)")
    eng = VLLMRollout(cfg.model, tokenizer, max_new_tokens=T, temperature=cfg.temperature, top_p=cfg.top_p,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed + info.rank,
                      dtype="bfloat16" if cfg.dtype == "auto" else cfg.dtype)
    if sync is not None:
        eng.sync_weights(sync)
    return eng
