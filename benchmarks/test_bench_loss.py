"""Benchmark (issue 3, item 5): forward + backward of GRPOLambdaLoss against TorchRL's GRPOLoss.

One group, ``loss fwd+bwd B=64 T=4096``, so pytest-benchmark prints the variants side by side:

* ``grpo``: ``torchrl.objectives.llm.GRPOLoss``;
* ``grpo-lambda:<style>``: ``creditlib.losses.GRPOLambdaLoss`` (``gamma * lam = 0.99``, clamp -0.1)
  with the ``recent``, ``both``, ``recent+eps`` (floor 0.05), ``recent+norm`` (row-normalised) and
  ``sequence`` (GSPO) styles, default ``"auto"`` backend;
* ``plain:recent``: ``creditlib.losses.grpo_lambda_loss`` on the same tensors.

The policy is out of the measurement: the current log-probs are a leaf tensor ``[B, T]`` that
requires grad, handed to the losses by :class:`GivenLogProbs` (an actor whose "distribution" returns
them), and the timed step is ``loss(td)`` + ``backward`` of the objective. Layout as TorchRL's: a
prompt block of 256 columns, then responses of 1920..3840 tokens, right-padded (``T = 4096``).

The overhead ratio (``grpo-lambda:recent`` median / ``grpo`` median) is the issue's figure; the
backend that ``"auto"`` picked is in each case's ``extra_info["backend"]``. Under
``--benchmark-disable`` every case runs once (a smoke test of a few seconds).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

pytest.importorskip("torchrl.objectives.llm.grpo")

from torchrl.objectives.llm import GRPOLoss  # noqa: E402

from creditlib import DecayStyle  # noqa: E402
from creditlib.ops.trace import choose_backend  # noqa: E402
from creditlib.losses import GRPOLambdaLoss, grpo_lambda_loss  # noqa: E402

B, SEQ, PROMPT = 64, 4096, 256
GROUP = f"loss fwd+bwd B={B} T={SEQ}"
STYLES = {
    "recent": DecayStyle("recent", gamma=1.0, lam=0.99),
    "both": DecayStyle("both", gamma=1.0, lam=0.99),
    "recent+eps": DecayStyle("recent", gamma=1.0, lam=0.99, eps=0.05),
    "recent+norm": DecayStyle("recent", gamma=1.0, lam=0.99, normalize=True),
    "sequence": DecayStyle("sequence"),
}


class _GivenDist:
    """The part of ``LLMMaskedCategorical`` GRPOLoss uses: ``.mask`` and ``.log_prob(action)``."""

    def __init__(self, logp: torch.Tensor, mask: torch.Tensor):
        self.logp, self.mask = logp, mask

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        if action.shape != self.logp.shape:
            raise ValueError(f"action shape {tuple(action.shape)} != log-prob shape {tuple(self.logp.shape)}")
        return self.logp


class GivenLogProbs(torch.nn.Module):
    """Actor that hands GRPOLoss precomputed log-probs (a leaf requiring grad): no model in the timing."""

    in_keys = [("tokens", "full")]

    def __init__(self, logp: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.logp, self.mask = logp, mask

    def get_dist(self, tensordict, **kwargs) -> _GivenDist:
        return _GivenDist(self.logp, self.mask)

    _get_sft_dist = get_dist


_DATA: dict = {}


def _data():
    """(td, actor, logp leaf, old [B, T], adv [B], mask [B, T]); built once per session."""
    if not _DATA:
        g = torch.Generator().manual_seed(0)
        lens = torch.randint((SEQ - PROMPT) // 2, SEQ - PROMPT + 1, (B,), generator=g)  # [B] response lengths
        col = torch.arange(SEQ)  # [T]
        mask = (col[None, :] >= PROMPT) & (col[None, :] < PROMPT + lens[:, None])  # [B, T] response tokens
        old = -3 * torch.rand(B, SEQ, generator=g)  # [B, T]
        old = torch.where(mask, old, torch.full_like(old, float("nan")))  # prompt / padding: unused
        logp = (torch.where(mask, old, torch.zeros(())) + 0.02 * torch.randn(B, SEQ, generator=g)).requires_grad_(True)
        adv = torch.randn(B, generator=g)  # [B]
        tokens = torch.randint(2, 1000, (B, SEQ), generator=g)  # [B, T] (only its shape is read)
        td = TensorDict({"tokens": {"full": tokens}, "log_probs": {"full": old},
                         "advantage": adv.reshape(B, 1, 1)}, batch_size=[B])
        _DATA.update(td=td, actor=GivenLogProbs(logp, mask), logp=logp, old=old, adv=adv, mask=mask)
    return _DATA


def _run(benchmark, step, variant, backend):
    benchmark.group = GROUP
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["backend"] = backend
    if not getattr(benchmark, "disabled", False):
        step()  # warm-up (allocations, lazy initialisation, a cached C++ build loading)
    benchmark(step)


def _torchrl_step(loss_fn, d):
    def step():
        d["logp"].grad = None
        out = loss_fn(d["td"])
        out.loss_objective.backward()
        return out
    return step


def test_grpoloss(benchmark):
    d = _data()
    loss_fn = GRPOLoss(d["actor"], entropy_bonus=False)
    _run(benchmark, _torchrl_step(loss_fn, d), "grpo", "none")
    assert torch.isfinite(d["logp"].grad).all()


@pytest.mark.parametrize("style_name", list(STYLES))
def test_grpolambdaloss(benchmark, style_name):
    d = _data()
    loss_fn = GRPOLambdaLoss(d["actor"], style=STYLES[style_name], clamp_min=-0.1, entropy_bonus=False)
    backend = choose_backend(d["logp"].detach())
    _run(benchmark, _torchrl_step(loss_fn, d), f"grpo-lambda:{style_name}", backend)
    assert torch.isfinite(d["logp"].grad).all()


def test_plain_loss(benchmark):
    d = _data()
    old = d["old"]
    style = STYLES["recent"]

    def step():
        d["logp"].grad = None
        loss, _ = grpo_lambda_loss(d["logp"], old, d["adv"], d["mask"], style)
        loss.backward()
        return loss
    _run(benchmark, step, "plain:recent", choose_backend(d["logp"].detach()))
    assert torch.isfinite(d["logp"].grad).all()
