"""The policy as a TorchRL actor: what :class:`creditlib.losses.GRPOLambdaLoss` scores.

Imports tensordict and torchrl (the ``[torchrl]`` extra, part of ``[rl]``).
"""

from __future__ import annotations

import torch

from .._extras import require

require("torchrl", "creditlib.rl.policy")  # ImportError naming the extra when tensordict/torchrl are missing
from tensordict.nn import TensorDictModuleBase  # noqa: E402

from .model import completion_logits, completion_logprobs  # noqa: E402

__all__ = ["CompletionPolicy"]


class CompletionPolicy(TensorDictModuleBase):
    """The policy as TorchRL's ``GRPOLoss`` (and :class:`creditlib.losses.GRPOLambdaLoss`) scores it.

    ``GRPOLoss`` asks its actor for ``get_dist(tensordict)`` and takes ``dist.log_prob(action)``;
    this actor returns TorchRL's ``LLMMaskedCategorical`` over the **completion** tokens with the
    logits divided by the sampling ``temperature``, so the importance ratio compares the policy that
    sampled the tokens with the one being trained. Point the loss at the completion keys::

        policy = CompletionPolicy(model, temperature=0.7)
        loss_fn = GRPOLambdaLoss(policy, style=DecayStyle("recent", lam=0.99), entropy_bonus=False)
        loss_fn.set_keys(action=("tokens", "response"), sample_log_prob=("log_probs", "response"))

    Why not TorchRL's ``TransformersWrapper``: its scoring path has no temperature (the ratio would
    be that of the untempered policy while the tokens come from the tempered one) and it computes
    logits over the prompt as well; this actor runs the LM head on the ``T + 1`` last positions
    only (``logits_to_keep``), as the recipe's sampler sees them.

    Reads ``("tokens", "prompt")`` ``[B, P]``, ``("masks", "prompt")`` ``[B, P]`` (left padded),
    ``("tokens", "response")`` ``[B, T]`` and ``mask_key`` (bool ``[B, T]``, default
    ``("masks", "response")``; point it at an entropy-selected loss mask to keep only those tokens
    in the loss). ``forward`` (no gradient needed: the sampling policy's log-probs) writes
    ``("log_probs", "response")`` ``[B, T]`` and, with ``entropy=True``, ``"entropy"`` ``[B, T]``.

    Args:
        model: a ``transformers`` causal LM (plain or FSDP2-sharded).
        temperature: the sampling temperature (> 0).
        mask_key: the tokens of the loss (``dist.mask``).
        entropy: ``forward`` also writes the per-token entropy.
        attention_key: key of a bool ``[B, T]`` mask of the completion positions the model attends
            to when they differ from the scored ``("masks", "response")`` (multi-turn rows: the
            environment's observations are context, never scored); ``None``: the response mask.
        on_policy: when the tensordict holds no ``("log_probs", "response")``, ``get_dist`` writes the
            current log-probs there, detached, as the sampling policy's: the importance ratio is 1 in
            value and the gradient is the policy gradient. Right only for **one** update on freshly
            sampled completions (TRL's ``num_iterations = 1`` shortcut); it saves a forward pass.
            With several updates per batch run ``forward`` first (under ``torch.no_grad()``).
    """

    def __init__(self, model, temperature: float = 1.0, *, mask_key=("masks", "response"), entropy: bool = False,
                 on_policy: bool = False, attention_key=None):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self.mask_key = mask_key
        self.entropy = bool(entropy)
        self.on_policy = bool(on_policy)
        self.attention_key = attention_key
        self.in_keys = [("tokens", "prompt"), ("masks", "prompt"), ("tokens", "response"), mask_key] + (
            [attention_key] if attention_key is not None else [])
        self.out_keys = [("log_probs", "response")] + (["entropy"] if entropy else [])

    def _inputs(self, td):
        resp_mask = td.get(("masks", "response"))  # [B, T] the scored completion tokens
        attn = resp_mask if self.attention_key is None else td.get(self.attention_key)  # [B, T] attended to
        return (td.get(("tokens", "prompt")), td.get(("masks", "prompt")), td.get(("tokens", "response")),
                resp_mask, attn)

    def get_dist(self, tensordict, **kwargs):
        """``LLMMaskedCategorical`` over the completion positions: logits ``[B, T, V]`` (tempered;
        float32, or float64 for a float64 model), mask ``tensordict[mask_key]`` ``[B, T]``."""
        from torchrl.modules.distributions import LLMMaskedCategorical

        prompt, prompt_mask, resp, resp_mask, attn = self._inputs(tensordict)
        logits = completion_logits(self.model, prompt, prompt_mask, resp, attn)  # [B, T, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature  # [B, T, V]
        mask = tensordict.get(self.mask_key)  # [B, T] bool
        dist = LLMMaskedCategorical(logits=logits, mask=mask & resp_mask)
        if self.on_policy and ("log_probs", "response") not in tensordict.keys(True):
            with torch.no_grad():  # the same op the loss applies next: the ratio is exactly 1
                tensordict.set(("log_probs", "response"), dist.log_prob(resp))  # [B, T]
        return dist

    def forward(self, tensordict):
        prompt, prompt_mask, resp, resp_mask, attn = self._inputs(tensordict)
        out = completion_logprobs(self.model, prompt, prompt_mask, resp, resp_mask, self.temperature,
                                  return_entropy=self.entropy, attention_mask=attn)  # [B, T] (and [B, T])
        if self.entropy:
            tensordict.set(("log_probs", "response"), out[0])
            tensordict.set("entropy", out[1])
        else:
            tensordict.set(("log_probs", "response"), out)
        return tensordict
