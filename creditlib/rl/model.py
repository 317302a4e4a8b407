"""Policy models: the embedded tiny Qwen2, any causal LM by name/path, and per-token log-probs."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["NonFiniteError", "tiny_qwen2", "load_causal_lm", "resolve_device", "resolve_dtype", "completion_logits",
           "completion_logprobs", "completion_entropy", "count_parameters"]


class NonFiniteError(FloatingPointError):
    """The policy produced NaN/inf (logits during a rollout, the loss, or the gradient norm)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: ``cuda`` (this rank's GPU under torchrun) when available, else ``cpu``."""
    import os

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 on CPU."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def tiny_qwen2(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 512, max_position_embeddings: int = 128, *, pad_token_id: int = 0,
               bos_token_id: int = 1, eos_token_id: int = 2):
    """A small Qwen2-architecture causal LM built from a config (random init, no download).

    Default shape: 2 layers, hidden 128, 4 heads (2 key/value heads), tied embeddings.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, use_cache=True, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def load_causal_lm(name_or_path: str, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str = "sdpa", gradient_checkpointing: bool = False):
    """Any causal LM (hub name or local ``save_pretrained`` directory) and its tokenizer.

    The tokenizer pads on the left (generation) and gets a pad token (EOS) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x: the new name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # older transformers (no deprecation there)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits at the positions that predict the completion tokens: ``[B, T, V]`` (model dtype).

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (mask: 1/True = real token).
        completion_ids, completion_mask: ``[B, T]`` completions (mask: bool, True = valid token).
    Only the last ``T + 1`` positions go through the LM head (``logits_to_keep``).
    """
    T = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attn = torch.cat([prompt_mask.to(torch.long), completion_mask.to(torch.long)], dim=1)  # [B, P+T]
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)  # [B, P+T] positions over real tokens (left padding)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                logits_to_keep=T + 1)
    return out.logits[:, :-1]  # [B, T, V]: logits at positions P-1 .. P+T-2 predict the completion


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0, chunk: int = 4,
                        return_entropy: bool = False, attention_mask: Optional[torch.Tensor] = None):
    """Log-probs of the completion tokens under ``model`` (tempered), differentiable.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (mask: 1 = real token).
        completion_ids, completion_mask: ``[B, T]`` completions (mask: bool, True = valid token).
        temperature: logits are divided by it, matching the sampling distribution.
        chunk: rows per log-softmax chunk (bounds the ``[chunk, T, V]`` float32 buffer on large vocabularies).
        return_entropy: also return the per-token entropy of the tempered policy (``[B, T]``, no gradient).
        attention_mask: ``[B, T]`` the completion positions the model attends to, when they differ
            from the scored ones (multi-turn rows: the environment's observations are attended to,
            never scored; :class:`creditlib.rl.multiturn.EpisodeBatch`). Default: ``completion_mask``.
    Returns:
        ``[B, T]`` log-probs (float32, float64 for a float64 model; 0 at masked positions); with
        ``return_entropy``, ``(logp, entropy)``.
    """
    B = prompt_ids.shape[0]
    attn = completion_mask if attention_mask is None else attention_mask  # [B, T]
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, attn)  # [B, T, V]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half models: float32; float64 stays float64
    rows, ents = [], []
    for s in range(0, B, chunk):
        lg = logits[s:s + chunk].to(dtype) / temperature  # [b, T, V]
        tok = completion_ids[s:s + chunk]  # [b, T]
        # the op TorchRL's LLMMaskedCategorical.log_prob applies (cross-entropy), so the sampling
        # policy's log-probs computed here and the loss's agree to the last bit
        rows.append(-torch.nn.functional.cross_entropy(lg.flatten(0, 1), tok.flatten(), reduction="none")
                    .view(tok.shape))  # [b, T]
        if return_entropy:
            with torch.no_grad():
                lp = torch.log_softmax(lg, dim=-1)  # [b, T, V]
                ents.append(-(lp.exp() * lp).sum(-1))  # [b, T]
    logp = torch.where(completion_mask, torch.cat(rows, dim=0), 0.0)  # [B, T], NaN-safe at masked positions
    if not return_entropy:
        return logp
    return logp, torch.where(completion_mask, torch.cat(ents, dim=0), 0.0)  # [B, T]


def completion_entropy(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                       chunk: int = 4) -> torch.Tensor:
    """Per-token entropy ``[B, T]`` of the tempered policy at the completion positions (no gradient; 0 masked)."""
    with torch.no_grad():
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                   chunk, return_entropy=True)[1]
