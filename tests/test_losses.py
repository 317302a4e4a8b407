"""GRPO-lambda losses: the plain-tensor loss, GRPOLambdaLoss (TorchRL), and the equivalences.

* plain loss against an independent float64 reference (dense trace per row, explicit PPO clip,
  explicit verl aggregations), for both styles, the eps floor, left padding and several runs;
* ratio 1: gradient == gradient of the plain PG surrogate with ``traced_credit`` advantages
  (the aggregation weight folded into the per-token advantage), for every aggregation;
* GRPOLambdaLoss with lam = 0 and no clamp == TorchRL's GRPOLoss (loss terms, metrics and
  parameter gradients) for every parent aggregation and option;
* GRPOLambdaLoss == grpo_lambda_loss on the same data (same tensors, and re-laid out so that the
  response starts at column 0: positions count from the first response token);
* NaN at masked positions never leaks; bf16 inputs; argument validation.

The TorchRL tests run a real (tiny) Qwen2 policy through TorchRL's TransformersWrapper.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.losses import (
    AGGREGATIONS,
    aggregate,
    aggregation_weights,
    clamp_advantages,
    clipped_surrogate,
    grpo_lambda_loss,
    parse_clip_eps,
    traced_log_ratio,
)

STYLES = [
    DecayStyle("recent", gamma=1.0, lam=0.9),
    DecayStyle("both", gamma=0.95, lam=0.8),
    DecayStyle("recent", gamma=1.0, lam=0.7, eps=0.3),
]
STYLE_IDS = ["recent", "both", "recent-eps"]


# ============================================================================ references
def _ref_trace(x: torch.Tensor, mask: torch.Tensor, style) -> torch.Tensor:
    """Dense per-row reference in float64: compact the valid tokens, z = W x, scatter back."""
    z = torch.zeros(x.shape, dtype=torch.float64)  # [B, T]
    for i in range(x.shape[0]):
        idx = mask[i].nonzero().flatten()  # [n_i]
        if idx.numel() == 0:
            continue
        xi = x[i, idx].double()  # [n_i]
        Wi = torch.eye(idx.numel(), dtype=torch.float64) if style is None else F.trace_weights(idx.numel(), style)
        z[i, idx] = Wi @ xi
    return z


def _ref_aggregate(v: torch.Tensor, mask: torch.Tensor, agg: str, scale=None) -> torch.Tensor:
    """verl's agg_loss written out with Python loops (float64)."""
    B, T = v.shape
    rows = [(v[i][mask[i]].double()) for i in range(B)]  # valid values per row
    nonempty = [r for r in rows if r.numel() > 0]
    if agg == "token-mean":
        n = sum(r.numel() for r in rows)
        return sum(r.sum() for r in rows) / max(n, 1)
    if agg == "seq-mean-token-mean":
        return sum(r.mean() for r in nonempty) / max(len(nonempty), 1)
    if agg == "seq-mean-token-sum":
        return sum(r.sum() for r in nonempty) / max(len(nonempty), 1)
    if agg == "seq-mean-token-sum-norm":
        return sum(r.sum() for r in nonempty) / max(len(nonempty), 1) / (T if scale is None else scale)
    raise AssertionError(agg)


def _ref_loss(logp, old, adv, mask, style, clip=(0.2, 0.2), clamp_min=-0.1, agg="token-mean", scale=None):
    """GRPO-lambda in float64, written from the formulas (ratio clipped in ratio space)."""
    x = torch.where(mask, logp.double() - old.double(), torch.zeros((), dtype=torch.float64))
    z = _ref_trace(x, mask, style)  # [B, T]
    A = adv.double()
    A = A[:, None].expand_as(z) if A.dim() == 1 else A
    if clamp_min is not None:
        A = torch.maximum(A, torch.full_like(A, clamp_min))
    r = z.exp()
    per_tok = -torch.minimum(r * A, r.clamp(1 - clip[0], 1 + clip[1]) * A)  # [B, T]
    return _ref_aggregate(per_tok, mask, agg, scale)


def _masks(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Left padding, right padding, several runs, one fully valid row and one empty row."""
    m = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
    m[0, 3:] = True                      # left padding (prompt/pad before the response)
    m[1, : T - 4] = True                 # right padding
    m[2, 2:6] = True
    m[2, 9: T - 1] = True                # two runs (multi-turn)
    m[3, :] = True                       # fully valid
    # row 4 stays empty
    for i in range(5, B):
        m[i] = torch.rand(T, generator=g) > 0.35  # scattered
    return m


def _data(B=8, T=17, seed=0, dtype=torch.float32, per_token_adv=False, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = _masks(B, T, g)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # [B, T]
    logp = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)  # [B, T]
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


# ============================================================================ plain-tensor loss
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregate_matches_verl_formulas(agg):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(7, 13, generator=g, dtype=torch.float64)  # [B, T]
    mask = _masks(7, 13, g)
    v_nan = torch.where(mask, v, torch.full_like(v, float("nan")))
    scale = 9.0 if agg == "seq-mean-token-sum-norm" else None
    got = aggregate(v_nan, mask, agg, loss_scale_factor=scale)
    torch.testing.assert_close(got, _ref_aggregate(v, mask, agg, scale), rtol=1e-12, atol=1e-12)
    # the weights reproduce the aggregation: sum_t c_t v_t
    c = aggregation_weights(mask, agg, loss_scale_factor=scale, dtype=torch.float64)
    torch.testing.assert_close((c * v).sum(), got, rtol=1e-12, atol=1e-12)
    # aliases with underscores
    torch.testing.assert_close(aggregate(v, mask, agg.replace("-", "_"), loss_scale_factor=scale), got)
    # the default constant of seq-mean-token-sum-norm is the padded length T
    if agg == "seq-mean-token-sum-norm":
        torch.testing.assert_close(aggregate(v, mask, agg), _ref_aggregate(v, mask, agg, 13))


def test_aggregate_all_masked_is_zero_not_nan():
    v = torch.full((3, 4), float("nan"))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for agg in AGGREGATIONS:
        out = aggregate(v, mask, agg)
        assert out.item() == 0.0


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv-seq", "adv-token"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("style", STYLES, ids=STYLE_IDS)
def test_plain_loss_matches_reference(style, agg, per_token_adv):
    logp, old, adv, mask = _data(per_token_adv=per_token_adv, dtype=torch.float64)
    clip = (0.15, 0.28)
    scale = 11.0 if agg == "seq-mean-token-sum-norm" else None
    loss, _ = grpo_lambda_loss(logp, old, adv, mask, style, clip_eps=clip, clamp_min=-0.1,
                               aggregation=agg, loss_scale_factor=scale)
    ref = _ref_loss(logp, old, adv, mask, style, clip=clip, clamp_min=-0.1, agg=agg, scale=scale)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_plain_loss_is_plain_grpo_when_lam_zero():
    logp, old, adv, mask = _data(dtype=torch.float64)
    ref = _ref_loss(logp, old, adv, mask, None, clamp_min=None)
    for style in (None, DecayStyle("recent", gamma=1.0, lam=0.0), DecayStyle("recent", gamma=0.0, lam=0.9)):
        loss, m = grpo_lambda_loss(logp, old, adv, mask, style, clamp_min=None)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m["trace_abs_mean"], m["log_ratio_abs_mean"])
    # and the trace changes it when lam > 0
    loss_l, _ = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], clamp_min=None)
    assert not torch.allclose(loss_l, ref)


def test_clamp_changes_loss_and_is_reported():
    logp, old, adv, mask = _data(dtype=torch.float64)
    adv = torch.tensor([-2.0, -0.05, 0.5, -1.0, 0.3, -0.2, 1.0, -0.1], dtype=torch.float64)
    l_on, m_on = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], clamp_min=-0.1)
    l_off, m_off = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], clamp_min=None)
    l_manual, _ = grpo_lambda_loss(logp, old, adv.clamp_min(-0.1), mask, STYLES[0], clamp_min=None)
    torch.testing.assert_close(l_on, l_manual)
    assert not torch.allclose(l_on, l_off)
    assert m_on["adv_clamped_fraction"].item() == pytest.approx(3 / 8)  # -2, -1, -0.2 (not -0.1 itself)
    assert m_off["adv_clamped_fraction"].item() == 0.0
    torch.testing.assert_close(clamp_advantages(adv, -0.1), adv.clamp_min(-0.1))
    assert clamp_advantages(adv, None) is adv


def test_metrics_values():
    logp, old, adv, mask = _data(dtype=torch.float64, scale=0.5)
    style = STYLES[1]
    clip = (0.2, 0.3)
    _, m = grpo_lambda_loss(logp, old, adv, mask, style, clip_eps=clip)
    x = torch.where(mask, logp - old, torch.zeros(()))
    z = _ref_trace(x, mask, style)
    n = mask.sum()
    torch.testing.assert_close(m["trace_abs_mean"], z.abs()[mask].sum() / n)
    torch.testing.assert_close(m["log_ratio_abs_mean"], x.abs()[mask].sum() / n)
    r = z.exp()
    outside = ((r < 1 - clip[0] - 1e-12) | (r > 1 + clip[1] + 1e-12))[mask]
    torch.testing.assert_close(m["traced_clip_fraction"], outside.double().mean())
    assert 0 < m["traced_clip_fraction"] < 1
    torch.testing.assert_close(m["ratio_mean"], r[mask].mean())
    torch.testing.assert_close(m["approx_kl"], (-x)[mask].mean())
    assert m["num_tokens"].item() == n.item()
    assert all(not v.requires_grad for v in m.values())


def test_clipped_surrogate_matches_ratio_space_clip():
    g = torch.Generator().manual_seed(3)
    lr = torch.randn(50, generator=g, dtype=torch.float64) * 0.5
    A = torch.randn(50, generator=g, dtype=torch.float64)
    loss, clipped = clipped_surrogate(lr, A, (0.1, 0.3))
    r = lr.exp()
    torch.testing.assert_close(loss, -torch.minimum(r * A, r.clamp(0.9, 1.3) * A))
    assert torch.equal(clipped, (r < 0.9) | (r > 1.3))
    assert parse_clip_eps(0.2) == (0.2, 0.2) and parse_clip_eps([0.1, 0.28]) == (0.1, 0.28)


def test_kl_and_entropy_terms():
    logp, old, adv, mask = _data(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    ref = old + 0.1 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    ent = torch.rand(old.shape, generator=g, dtype=torch.float64)
    agg = "seq-mean-token-mean"
    base, _ = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], aggregation=agg)
    loss, m = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], aggregation=agg, ref_logp=ref, kl_coef=0.05,
                               entropy=ent, entropy_coef=0.01)
    d = ref - logp
    kl = _ref_aggregate(d.exp() - d - 1, mask, agg)
    H = _ref_aggregate(ent, mask, agg)
    torch.testing.assert_close(loss, base + 0.05 * kl - 0.01 * H)
    torch.testing.assert_close(m["kl_to_ref"], kl)
    torch.testing.assert_close(m["entropy"], H)
    torch.testing.assert_close(m["loss_kl"], 0.05 * kl)
    torch.testing.assert_close(m["loss_entropy"], -0.01 * H)
    # coefficients 0: metrics only, loss unchanged
    loss0, m0 = grpo_lambda_loss(logp, old, adv, mask, STYLES[0], aggregation=agg, ref_logp=ref, entropy=ent)
    torch.testing.assert_close(loss0, base)
    assert "loss_kl" not in m0 and "kl_to_ref" in m0


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("style", STYLES, ids=STYLE_IDS)
def test_ratio_one_gradient_is_traced_credit(style, agg):
    """At ratio 1 the gradient is that of -sum_j C_j logp_j, C = traced_credit(A' * c)."""
    _, old, adv, mask = _data(dtype=torch.float64)
    logp = old.clone().requires_grad_(True)  # ratio exactly 1
    scale = 10.0 if agg == "seq-mean-token-sum-norm" else None
    loss, m = grpo_lambda_loss(logp, old, adv, mask, style, aggregation=agg, loss_scale_factor=scale)
    (grad,) = torch.autograd.grad(loss, logp)
    A = adv.clamp_min(-0.1)  # [B]
    c = aggregation_weights(mask, agg, loss_scale_factor=scale, dtype=torch.float64)  # [B, T]
    C = F.traced_credit(A[:, None] * c, mask, style)  # [B, T]
    lp2 = old.clone().requires_grad_(True)
    surrogate = -(torch.where(mask, lp2, torch.zeros(())) * C).sum()
    (grad_pg,) = torch.autograd.grad(surrogate, lp2)
    torch.testing.assert_close(grad, grad_pg, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, -C, rtol=1e-10, atol=1e-13)
    # the loss value at ratio 1 does not see the trace: -agg(A')
    torch.testing.assert_close(loss, aggregate(-A[:, None].expand_as(c).clone(), mask, agg, loss_scale_factor=scale))
    # and the trace does show in the gradient: it differs from plain GRPO's
    (g0,) = torch.autograd.grad(grpo_lambda_loss(logp, old, adv, mask, None, aggregation=agg,
                                                 loss_scale_factor=scale)[0], logp)
    assert not torch.allclose(grad, g0)
    assert m["trace_abs_mean"].item() == 0.0


def test_nan_at_masked_positions_does_not_leak():
    logp, old, adv, mask = _data(per_token_adv=True)
    ref = old - 0.05
    ent = torch.rand_like(old)
    nan = torch.full_like(old, float("nan"))
    inf = torch.full_like(old, float("inf"))

    def run(fill, fill_old):
        lp = torch.where(mask, logp, fill).requires_grad_(True)
        args = dict(ref_logp=torch.where(mask, ref, fill), kl_coef=0.1, entropy=torch.where(mask, ent, fill),
                    entropy_coef=0.01, aggregation="seq-mean-token-mean")
        loss, m = grpo_lambda_loss(lp, torch.where(mask, old, fill_old), torch.where(mask, adv, fill), mask,
                                   STYLES[2], **args)
        (g,) = torch.autograd.grad(loss, lp)
        return loss, m, g

    loss0, m0, g0 = run(torch.zeros_like(old), torch.zeros_like(old))
    loss1, m1, g1 = run(nan, -inf)
    assert torch.isfinite(loss1) and torch.isfinite(g1).all()
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(g1, g0)
    assert (g1[~mask] == 0).all()
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k])


def test_bf16_inputs():
    logp, old, adv, mask = _data()
    lp16 = logp.bfloat16().requires_grad_(True)
    old16, adv16 = old.bfloat16(), adv.bfloat16()
    loss16, m16 = grpo_lambda_loss(lp16, old16, adv16, mask, STYLES[0], aggregation="seq-mean-token-sum")
    assert loss16.dtype == torch.float32  # half inputs are computed in float32
    (g16,) = torch.autograd.grad(loss16, lp16)
    assert g16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    # same numbers as float32 on the bf16-rounded values
    lp32 = lp16.detach().float().requires_grad_(True)
    loss32, _ = grpo_lambda_loss(lp32, old16.float(), adv16.float(), mask, STYLES[0], aggregation="seq-mean-token-sum")
    (g32,) = torch.autograd.grad(loss32, lp32)
    torch.testing.assert_close(loss16, loss32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g16.float(), g32.bfloat16().float())
    # and close to the float64 reference on the same bf16 values
    ref = _ref_loss(lp16.detach(), old16, adv16, mask, STYLES[0], agg="seq-mean-token-sum")
    torch.testing.assert_close(loss16.double(), ref, rtol=1e-5, atol=1e-6)


def test_traced_log_ratio():
    logp, old, _, mask = _data(dtype=torch.float64)
    for style in STYLES + [None]:
        z = traced_log_ratio(logp, old, mask, style)
        torch.testing.assert_close(z, _ref_trace(logp - old, mask, style), rtol=1e-10, atol=1e-12)
        assert (z[~mask] == 0).all()


def _bad_calls():
    B, T = 3, 5
    lp = torch.zeros(B, T)
    old = torch.zeros(B, T)
    adv = torch.zeros(B)
    m = torch.ones(B, T, dtype=torch.bool)
    s = DecayStyle("recent", lam=0.9)
    yield "logp", dict(logp=torch.zeros(B, T, dtype=torch.long))
    yield "logp must be 2-D", dict(logp=torch.zeros(B * T), old=torch.zeros(B * T), m=torch.ones(B * T, dtype=torch.bool))
    yield "old_logp must have shape", dict(old=torch.zeros(B, T + 1))
    yield "old_logp must not require grad", dict(old=torch.zeros(B, T, requires_grad=True))
    yield "mask must be a bool", dict(m=torch.ones(B, T))
    yield "mask shape", dict(m=torch.ones(B, T + 1, dtype=torch.bool))
    yield "advantages must have shape", dict(adv=torch.zeros(B + 1))
    yield "advantages must be a floating", dict(adv=torch.zeros(B, dtype=torch.long))
    yield "style must be", dict(s="recent")
    yield "clip_eps", dict(kw=dict(clip_eps=(0.1, 0.2, 0.3)))
    yield "clip_eps low", dict(kw=dict(clip_eps=(1.0, 0.2)))
    yield "clip_eps high", dict(kw=dict(clip_eps=(0.2, -0.1)))
    yield "clip_eps", dict(kw=dict(clip_eps="0.2"))
    yield "aggregation must be one of", dict(kw=dict(aggregation="token-sum"))
    yield "loss_scale_factor is only used", dict(kw=dict(loss_scale_factor=8.0))
    yield "loss_scale_factor must be a positive", dict(kw=dict(aggregation="seq-mean-token-sum-norm", loss_scale_factor=0))
    yield "clamp_min", dict(kw=dict(clamp_min=float("nan")))
    yield "clamp_min must be None or a finite float <= 0", dict(kw=dict(clamp_min=0.1))
    yield "mask must be a bool", dict(kw=dict(loss_mask=torch.ones(B, T)))
    yield "mask shape", dict(kw=dict(loss_mask=torch.ones(B, T + 1, dtype=torch.bool)))
    yield "kl_coef > 0 needs ref_logp", dict(kw=dict(kl_coef=0.1))
    yield "kl_coef must be", dict(kw=dict(kl_coef=-1.0, ref_logp=torch.zeros(B, T)))
    yield "ref_logp must have shape", dict(kw=dict(ref_logp=torch.zeros(B, T + 1)))
    yield "entropy_coef != 0 needs entropy", dict(kw=dict(entropy_coef=0.01))
    yield "entropy must have shape", dict(kw=dict(entropy=torch.zeros(B)))
    yield "backend must be one of", dict(kw=dict(backend="gpu"))


@pytest.mark.parametrize("match,bad", list(_bad_calls()), ids=[c[0][:30] for c in _bad_calls()])
def test_plain_loss_validation(match, bad):
    B, T = 3, 5
    args = dict(logp=torch.zeros(B, T), old=torch.zeros(B, T), adv=torch.zeros(B),
                m=torch.ones(B, T, dtype=torch.bool), s=DecayStyle("recent", lam=0.9), kw={})
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        grpo_lambda_loss(args["logp"], args["old"], args["adv"], args["m"], args["s"], **args["kw"])


# ============================================================================ new styles, loss mask, empty inputs
def _explicit_weights(n: int, style) -> torch.Tensor:
    """w(t, j) written out from docs/design.md section 2 (loops, float64), independent of F.trace_weights."""
    W = torch.zeros(n, n, dtype=torch.float64)
    if style.style == "sequence":
        return torch.full((n, n), 1.0 / n, dtype=torch.float64) if n else W
    d = style.gamma * style.lam
    for t in range(n):
        for j in range(t + 1):
            w = d ** (t - j)  # Python: 0.0 ** 0 == 1.0
            if style.style == "both":
                w = max(w, d ** j)
            W[t, j] = max(w, style.eps)
        if style.normalize:
            W[t, : t + 1] /= W[t, : t + 1].sum()
    return W


NEW_STYLES = [
    DecayStyle("recent", gamma=1.0, lam=0.9, normalize=True),
    DecayStyle("both", gamma=0.95, lam=0.8, eps=0.1, normalize=True),
    DecayStyle("recent", gamma=1.0, lam=1.0, normalize=True),  # causal running mean
    DecayStyle("sequence"),
]
NEW_STYLE_IDS = ["recent-norm", "both-eps-norm", "running-mean", "sequence"]


def _explicit_loss(logp, old, adv, mask, style, clip, clamp_min, agg, loss_mask=None):
    B, T = logp.shape
    x = torch.where(mask, logp - old, torch.zeros((), dtype=logp.dtype))  # [B, T]
    z = torch.zeros_like(x)
    for i in range(B):
        idx = mask[i].nonzero().flatten()
        if idx.numel():
            z[i, idx] = _explicit_weights(idx.numel(), style).to(x.dtype) @ x[i, idx]
    A = adv[:, None].expand_as(z) if adv.dim() == 1 else adv
    if clamp_min is not None:
        A = A.clamp_min(clamp_min)
    r = z.exp()
    per_tok = -torch.minimum(r * A, r.clamp(1 - clip[0], 1 + clip[1]) * A)  # [B, T]
    if loss_mask is not None:
        per_tok = torch.where(loss_mask, per_tok, torch.zeros((), dtype=per_tok.dtype))
    return _ref_aggregate(per_tok, mask, agg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("style", NEW_STYLES, ids=NEW_STYLE_IDS)
def test_plain_loss_new_styles_match_definition(style, agg):
    """Normalised and sequence styles pass through the loss: values, and float64 gradients."""
    logp, old, adv, mask = _data(dtype=torch.float64, per_token_adv=agg == "seq-mean-token-sum")
    clip = (0.2, 0.28)
    loss, _ = grpo_lambda_loss(logp, old, adv, mask, style, clip_eps=clip, clamp_min=-0.1, aggregation=agg)
    ref = _explicit_loss(logp, old, adv, mask, style, clip, -0.1, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    lp = logp.clone().requires_grad_(True)
    lp2 = logp.clone().requires_grad_(True)
    g = torch.autograd.grad(grpo_lambda_loss(lp, old, adv, mask, style, clip_eps=clip, aggregation=agg)[0], lp)[0]
    g_ref = torch.autograd.grad(_explicit_loss(lp2, old, adv, mask, style, clip, -0.1, agg), lp2)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_sequence_style_is_gspo():
    """DecayStyle("sequence") with the per-sequence aggregation is GSPO (arXiv 2507.18071, eq. 5-7):
    J = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i), s_i = exp(mean_t log-ratio),
    written here per sequence; equal values and float64 gradients, with GSPO's tiny clip range."""
    logp, old, adv, mask = _data(B=10, T=19, dtype=torch.float64, scale=1e-3, seed=3)
    clip = (3e-4, 4e-4)  # GSPO's clip range
    lp = logp.clone().requires_grad_(True)
    loss, m = grpo_lambda_loss(lp, old, adv, mask, DecayStyle("sequence"), clip_eps=clip, clamp_min=None,
                               aggregation="seq-mean-token-mean")
    lp2 = logp.clone().requires_grad_(True)
    terms, n_clipped = [], 0
    for i in range(lp2.shape[0]):
        idx = mask[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        s_i = (lp2[i, idx] - old[i, idx]).mean().exp()
        n_clipped += int(not (1 - clip[0] <= s_i.item() <= 1 + clip[1]))
        terms.append(torch.minimum(s_i * adv[i], s_i.clamp(1 - clip[0], 1 + clip[1]) * adv[i]))
    gspo = -torch.stack(terms).mean()
    assert 0 < n_clipped < len(terms)  # both branches of the clip are exercised
    torch.testing.assert_close(loss, gspo, rtol=1e-10, atol=1e-13)
    g, g_ref = torch.autograd.grad(loss, lp)[0], torch.autograd.grad(gspo, lp2)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_loss_mask_trl_convention(agg):
    """loss_mask zeroes the policy term of unselected tokens; aggregation weights stay those of mask."""
    logp, old, adv, mask = _data(dtype=torch.float64, per_token_adv=True)
    g = torch.Generator().manual_seed(5)
    ent = torch.rand(mask.shape, generator=g, dtype=torch.float64)
    sel = F.entropy_mask(ent, mask, 0.3)  # [B, T]
    style = STYLES[0]
    kw = dict(clip_eps=(0.2, 0.28), clamp_min=-0.1, aggregation=agg, ref_logp=old, kl_coef=0.1)
    loss, m = grpo_lambda_loss(logp, old, adv, mask, style, loss_mask=sel, **kw)
    ref_pol = _explicit_loss(logp, old, adv, mask, DecayStyle("recent", gamma=1.0, lam=0.9), (0.2, 0.28), -0.1, agg,
                             loss_mask=sel)
    torch.testing.assert_close(m["loss_policy"], ref_pol, rtol=1e-10, atol=1e-12)
    _, m_all = grpo_lambda_loss(logp, old, adv, mask, style, **kw)
    torch.testing.assert_close(m["kl_to_ref"], m_all["kl_to_ref"])  # KL over mask, unchanged
    torch.testing.assert_close(loss - m["loss_policy"], m_all["loss_kl"])
    torch.testing.assert_close(m["loss_mask_fraction"], (sel.sum() / mask.sum()).double())
    # loss_mask = mask is the unselected loss
    l_same, _ = grpo_lambda_loss(logp, old, adv, mask, style, loss_mask=mask, **kw)
    _, m0 = grpo_lambda_loss(logp, old, adv, mask, style, **kw)
    torch.testing.assert_close(l_same, m0["loss_policy"] + m0["loss_kl"])
    # untraced: no gradient reaches unselected tokens; gradcheck in float64
    lp = logp.clone().requires_grad_(True)
    grad = torch.autograd.grad(grpo_lambda_loss(lp, old, adv, mask, None, loss_mask=sel, aggregation=agg)[0], lp)[0]
    assert (grad[~sel] == 0).all() and (grad[sel] != 0).any()
    small = slice(0, 4), slice(0, 7)
    args = (old[small], adv[small], mask[small], DecayStyle("both", gamma=1.0, lam=0.8, normalize=True))
    assert torch.autograd.gradcheck(
        lambda x: grpo_lambda_loss(x, *args, loss_mask=sel[small], aggregation=agg)[0],
        (logp[small].clone().requires_grad_(True),))


@pytest.mark.parametrize("B,T", [(0, 6), (4, 0), (0, 0)])
@pytest.mark.parametrize("style", [None, STYLES[1], NEW_STYLES[0], NEW_STYLES[3]], ids=["none", "both", "norm", "seq"])
def test_empty_inputs_give_zero_loss_and_backward(B, T, style):
    for agg in AGGREGATIONS:
        for per_token in (False, True):
            lp = torch.randn(B, T).requires_grad_(True)
            old = torch.randn(B, T)
            adv = torch.randn(B, T) if per_token else torch.randn(B)
            mask = torch.ones(B, T, dtype=torch.bool)
            loss, m = grpo_lambda_loss(lp, old, adv, mask, style, aggregation=agg, ref_logp=old, kl_coef=0.1,
                                       entropy=old, entropy_coef=0.01, loss_mask=mask)
            assert loss.item() == 0.0 and loss.requires_grad
            assert all(torch.isfinite(v) for v in m.values())
            loss.backward()  # the graph reaches logp: an empty rank can join a distributed backward
            assert lp.grad is not None and lp.grad.shape == (B, T)


def test_clipped_surrogate_is_the_two_branch_min_bitwise():
    """One clamp == -min(r A, clip(r) A) in log space (TorchRL's GRPOLoss form): equal values, clip
    flags and gradients, also exactly at the bounds; just outside a bound it follows the exact min."""
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float64, torch.float32):
        for clip in ((0.2, 0.2), (0.1, 0.28), (0.0, 0.0)):
            # the bounds as clamp rounds a Python float bound to dtype
            lo = torch.tensor(math.log1p(-clip[0]), dtype=dtype)
            hi = torch.tensor(math.log1p(clip[1]), dtype=dtype)
            edge = torch.stack([lo, hi, lo - 0.2, hi + 0.2, torch.zeros((), dtype=dtype)])
            edge = torch.cat([edge, torch.tensor([-1.5, 1.5], dtype=dtype)])
            lw = torch.cat([edge, 0.4 * torch.randn(30, generator=g, dtype=dtype)]).expand(5, -1).contiguous()
            for adv in (torch.tensor([[1.0], [-1.0], [0.0], [-0.0], [0.7]], dtype=dtype),
                        torch.randn(lw.shape, generator=g, dtype=dtype)):
                a1, a2 = lw.clone().requires_grad_(True), lw.clone().requires_grad_(True)
                l1, c1 = clipped_surrogate(a1, adv, clip)
                lc = a2.clamp(math.log1p(-clip[0]), math.log1p(clip[1]))
                l2 = -torch.stack([a2.exp() * adv, lc.exp() * adv], -1).min(-1).values
                assert torch.equal(l1, l2) and torch.equal(c1, lc != a2)
                w = torch.randn(l1.shape, generator=g, dtype=dtype)
                assert torch.equal(torch.autograd.grad(l1, a1, w)[0], torch.autograd.grad(l2, a2, w)[0])
            # one ulp outside the low bound with A < 0: the clipped branch is the min (gradient 0),
            # even when exp rounds both branches to the same value
            below = torch.nextafter(lo, torch.tensor(-1.0, dtype=dtype)).reshape(1).requires_grad_(True)
            loss, clipped = clipped_surrogate(below, torch.tensor([-1.0], dtype=dtype), clip)
            assert clipped.item() and torch.autograd.grad(loss.sum(), below)[0].item() == 0.0


def test_positive_clamp_is_rejected_everywhere():
    adv = torch.randn(4)
    with pytest.raises(ValueError, match="clamp_min must be None or a finite float <= 0"):
        clamp_advantages(adv, 0.2)
    with pytest.raises(ValueError, match="clamp_min"):
        clamp_advantages(adv, "x")
    torch.testing.assert_close(clamp_advantages(adv, 0), adv.clamp_min(0.0))


# ============================================================================ TorchRL
torchrl_grpo = pytest.importorskip("torchrl.objectives.llm.grpo")
from tensordict import TensorDict  # noqa: E402
from torchrl.objectives.llm import GRPOLoss  # noqa: E402

from creditlib.losses import GRPOLambdaLoss, GRPOLambdaLossOutput  # noqa: E402

PAD, EOS = 0, 1
VOCAB = ["<pad>", "<eos>"] + [f"w{i}" for i in range(14)]
PARENT_AGGS = ["token_mean", "prompt_mean", "none"]


def _tiny_actor(seed=0, dtype=torch.float32):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torchrl.modules.llm import TransformersWrapper
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
    cfg = Qwen2Config(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    actor = TransformersWrapper(model, tokenizer=hf, input_mode="tokens", generate=False, pad_output=True)
    return actor, model


P_COLS, R_COLS = 4, 8
PROMPT_LENS = [4, 2, 3, 1, 4, 2]
RESP_LENS = [8, 5, 8, 3, 6, 7]


def _batch(actor, seed=0, per_token_adv=False, two_runs=False, nan_fill=True, noise=0.3):
    # nan_fill: NaN in the old log-probs outside the loss mask (the response, or the assistant runs)
    """TorchRL layout: [B, P + R] = left-padded prompt block | response block (pad after EOS)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(PROMPT_LENS), P_COLS + R_COLS
    tokens = torch.full((B, T), PAD, dtype=torch.long)  # [B, T]
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        tokens[i, P_COLS - p: P_COLS] = torch.randint(2, len(VOCAB), (p,), generator=g)
        tokens[i, P_COLS: P_COLS + r] = torch.randint(2, len(VOCAB), (r,), generator=g)
        if r < R_COLS:
            tokens[i, P_COLS + r - 1] = EOS
    attn = tokens != PAD  # [B, T]
    td = TensorDict({"tokens": {"full": tokens, "prompt": tokens[:, :P_COLS]},
                     "masks": {"all_attention_mask": attn}}, batch_size=[B])
    resp = attn.clone()  # [B, T] the response block
    resp[:, :P_COLS] = False
    visible = resp
    if two_runs:  # multi-turn: assistant tokens in two runs (last prompt token + response minus a "user" gap)
        visible = attn.clone()
        visible[:, : P_COLS - 1] = False
        visible[:, P_COLS + 1: P_COLS + 3] = False
        td["masks", "all_assistant_mask"] = visible
    with torch.no_grad():
        cur = actor(td.copy())["log_probs", "full"].float()  # [B, T]
    old = cur + noise * torch.randn(cur.shape, generator=g)  # ratio != 1
    if nan_fill:  # garbage where the loss must not look
        old = torch.where(visible, old, torch.full_like(old, float("nan")))
    td["log_probs"] = {"full": old}
    td["next", "ref_log_probs", "full"] = cur + 0.2 * torch.randn(cur.shape, generator=g)
    if per_token_adv:
        td["advantage"] = torch.randn(B, T, 1, generator=g)
    else:
        td["advantage"] = torch.tensor([1.2, -0.8, -0.05, 0.4, -1.5, 0.3]).reshape(B, 1, 1)
    return td


@pytest.fixture(scope="module")
def actor():
    return _tiny_actor()[0]


def _params(actor):
    return [p for p in actor.model.parameters() if p.requires_grad]


def _terms(out):
    return {k: v for k, v in out.to_tensordict().items() if k.startswith("loss_")}


def _grads(actor, out):
    total = sum(v.sum() for v in _terms(out).values())  # sum() covers aggregation="none"
    return torch.autograd.grad(total, _params(actor), allow_unused=True)


def _assert_same(a, b, rtol=1e-6, atol=1e-7):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


PARENT_OPTIONS = {
    "default": dict(),
    "asym-clip+kl-ref+kl-inference": dict(clip_epsilon=(0.1, 0.28), kl_to_ref_coeff=0.05, kl_to_inference_coeff=0.02),
    "kl-mask": dict(kl_mask_threshold=0.02),
    "no-entropy": dict(entropy_bonus=False),
    "generic-mask": dict(masking_strategy="generic"),
}
# every aggregation with the options that touch the masks or the terms; the rest with one
PARENT_CASES = [(a, o) for a in PARENT_AGGS for o in ("default", "asym-clip+kl-ref+kl-inference", "kl-mask")]
PARENT_CASES += [("prompt_mean", "no-entropy"), ("token_mean", "generic-mask")]


@pytest.mark.parametrize("agg,option", PARENT_CASES, ids=[f"{a}-{o}" for a, o in PARENT_CASES])
def test_equals_grpoloss_at_lambda_zero(actor, agg, option):
    kw = dict(PARENT_OPTIONS[option], aggregation=agg)
    td = _batch(actor, nan_fill=option != "generic-mask")
    parent = GRPOLoss(actor, **kw)
    ours = GRPOLambdaLoss(actor, style=DecayStyle("recent", gamma=1.0, lam=0.0), clamp_min=None, **kw)
    out_p, out_o = parent(td.clone()), ours(td.clone())
    assert isinstance(out_o, GRPOLambdaLossOutput)
    tp, to = _terms(out_p), _terms(out_o)
    assert set(tp) == set(to) and "loss_objective" in tp
    for k in tp:
        _assert_same(to[k], tp[k])
    for k in ("clip_fraction", "kl_approx", "ESS"):
        _assert_same(out_o.get(k), out_p.get(k))
    for gp, go in zip(_grads(actor, out_p), _grads(actor, out_o)):
        if gp is None:
            assert go is None
        else:
            _assert_same(go, gp)
    # style=None is the same as lam=0
    out_n = GRPOLambdaLoss(actor, style=None, clamp_min=None, **kw)(td.clone())
    _assert_same(out_n.loss_objective, out_p.loss_objective)


@pytest.mark.parametrize("agg", PARENT_AGGS)
def test_equals_grpoloss_multirun_rlhf_mask(actor, agg):
    td = _batch(actor, two_runs=True, per_token_adv=True)
    kw = dict(aggregation=agg, masking_strategy="rlhf")
    out_p = GRPOLoss(actor, **kw)(td.clone())
    out_o = GRPOLambdaLoss(actor, style=None, clamp_min=None, **kw)(td.clone())
    _assert_same(out_o.loss_objective, out_p.loss_objective)
    for gp, go in zip(_grads(actor, out_p), _grads(actor, out_o)):
        _assert_same(go, gp)
    if agg == "none":
        return
    # with the trace: positions count the assistant tokens of both runs (== the plain loss on them)
    loss_fn = GRPOLambdaLoss(actor, style=STYLES[1], entropy_bonus=False, **kw)
    out_l = loss_fn(td.clone())
    cur, old, mask = _dist_logp(loss_fn, td)  # [B, T]
    assert ((mask[:, 1:].int() - mask[:, :-1].int()) == 1).sum(-1).max() >= 2  # two runs per row
    loss, _ = grpo_lambda_loss(cur, old, td["advantage"].squeeze(-1), mask, STYLES[1],
                               aggregation={"token_mean": "token-mean"}.get(agg, "seq-mean-token-mean"))
    _assert_same(out_l.loss_objective.reshape(()), loss)


def _dist_logp(loss_fn, td):
    """The current log-probs and loss mask exactly as GRPOLoss computes them."""
    cur, dist, _ = loss_fn._get_cur_log_prob(td.copy())
    old = td["log_probs", "full"]
    mask = dist.mask & torch.isfinite(old)
    return cur, old, mask


AGG_PAIRS = [  # (TorchRL name, plain-loss name)
    ("token_mean", "token-mean"),
    ("prompt_mean", "seq-mean-token-mean"),
    ("seq-mean-token-mean", "seq-mean-token-mean"),
    ("seq-mean-token-sum", "seq-mean-token-sum"),
    ("seq-mean-token-sum-norm", "seq-mean-token-sum-norm"),
]


SP_CASES = [(STYLES[0], False), (STYLES[1], True), (STYLES[2], False)]  # (style, per-token advantages)


@pytest.mark.parametrize("style,per_token_adv", SP_CASES, ids=["recent-adv-seq", "both-adv-token", "eps-adv-seq"])
@pytest.mark.parametrize("agg_rl,agg_plain", AGG_PAIRS, ids=[a for a, _ in AGG_PAIRS])
def test_plain_loss_equals_grpolambdaloss(actor, agg_rl, agg_plain, style, per_token_adv):
    td = _batch(actor, per_token_adv=per_token_adv)
    scale = 8.0 if agg_plain == "seq-mean-token-sum-norm" else None
    loss_fn = GRPOLambdaLoss(actor, style=style, clamp_min=-0.1, clip_epsilon=(0.2, 0.28), entropy_bonus=False,
                             aggregation=agg_rl, loss_scale_factor=scale if agg_rl == agg_plain else None)
    out = loss_fn(td.clone())
    cur, old, mask = _dist_logp(loss_fn, td)  # [B, T] each
    adv = td["advantage"].squeeze(-1)  # [B, 1] or [B, T]
    kw = dict(clip_eps=(0.2, 0.28), clamp_min=-0.1, aggregation=agg_plain, loss_scale_factor=scale)
    loss, m = grpo_lambda_loss(cur, old.detach(), adv, mask, style, **kw)
    _assert_same(out.loss_objective.reshape(()), loss)  # the parent's prompt_mean returns shape [1]
    _assert_same(out.trace_abs_mean, m["trace_abs_mean"])
    _assert_same(out.traced_clip_fraction, m["traced_clip_fraction"])
    _assert_same(out.adv_clamped_fraction, m["adv_clamped_fraction"])
    g_rl = torch.autograd.grad(out.loss_objective, _params(actor))
    g_pl = torch.autograd.grad(loss, _params(actor))
    for a, b in zip(g_rl, g_pl):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)

    # positions count from the first response token: the same loss on a [B, R] layout with the
    # response moved to column 0 (no prompt, right padding only)
    B, T = mask.shape
    R = int(mask.sum(-1).max())
    idx = torch.arange(T).expand(B, T)
    order = torch.where(mask, idx, idx + T).argsort(-1)[:, :R]  # valid columns first, in order
    m2 = mask.gather(1, order)  # [B, R]
    g2 = lambda t: t.gather(1, order)  # noqa: E731
    adv2 = adv if adv.shape[-1] == 1 else g2(adv)
    loss2, _ = grpo_lambda_loss(g2(cur), g2(old), adv2, m2, style, **kw)
    _assert_same(loss2, loss)


R1_CASES = [(a, STYLES[0]) for a in ("token_mean", "prompt_mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")]
R1_CASES += [("token_mean", STYLES[1]), ("prompt_mean", STYLES[2])]


@pytest.mark.parametrize("agg,style", R1_CASES, ids=[f"{a}-{s}" for a, s in R1_CASES])
def test_grpolambdaloss_ratio_one_gradient_is_traced_credit(actor, style, agg):
    """At ratio 1 the parameter gradient equals that of -sum_j C_j logp_j, C = traced_credit(A' c)."""
    td = _batch(actor)
    scale = 8.0 if agg == "seq-mean-token-sum-norm" else None
    loss_fn = GRPOLambdaLoss(actor, style=style, entropy_bonus=False, aggregation=agg, loss_scale_factor=scale)
    with torch.no_grad():
        cur0, _, _ = _dist_logp(loss_fn, td)
    td["log_probs", "full"] = torch.where(td["masks", "all_attention_mask"], cur0, td["log_probs", "full"])
    out = loss_fn(td.clone())
    assert out.trace_abs_mean.item() == 0.0 and out.traced_clip_fraction.item() == 0.0
    cur, old, mask = _dist_logp(loss_fn, td)
    A = td["advantage"].reshape(-1).clamp_min(-0.1)  # [B]
    plain_agg = {"token_mean": "token-mean", "prompt_mean": "seq-mean-token-mean"}.get(agg, agg)
    c = aggregation_weights(mask, plain_agg, loss_scale_factor=scale)  # [B, T]
    C = F.traced_credit(A[:, None] * c, mask, style)  # [B, T]
    surrogate = -(torch.where(mask, cur, torch.zeros(())) * C).sum()
    for a, b in zip(torch.autograd.grad(out.loss_objective, _params(actor)),
                    torch.autograd.grad(surrogate, _params(actor))):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)


def test_trace_actually_used_and_nan_safe(actor):
    td = _batch(actor)
    out_l = GRPOLambdaLoss(actor, style=STYLES[0])(td.clone())
    out_0 = GRPOLambdaLoss(actor, style=None)(td.clone())
    assert torch.isfinite(out_l.loss_objective) and torch.isfinite(out_l.ESS)
    assert not torch.allclose(out_l.loss_objective, out_0.loss_objective)
    assert out_l.trace_abs_mean > out_0.trace_abs_mean > 0
    # NaN in the old log-probs at prompt / padding positions changes nothing
    td0 = td.clone()
    old = td0["log_probs", "full"]
    td0["log_probs", "full"] = torch.where(torch.isfinite(old), old, torch.zeros_like(old))
    out_z = GRPOLambdaLoss(actor, style=STYLES[0])(td0)
    _assert_same(out_z.loss_objective, out_l.loss_objective)
    for g in _grads(actor, out_l):
        assert g is None or torch.isfinite(g).all()


def test_clamp_metric_and_effect(actor):
    td = _batch(actor)
    out_c = GRPOLambdaLoss(actor, style=STYLES[0], clamp_min=-0.1)(td.clone())
    out_n = GRPOLambdaLoss(actor, style=STYLES[0], clamp_min=None)(td.clone())
    assert out_c.adv_clamped_fraction.item() == pytest.approx(2 / 6)  # -0.8 and -1.5
    assert out_n.adv_clamped_fraction.item() == 0.0
    assert not torch.allclose(out_c.loss_objective, out_n.loss_objective)
    assert {"trace_abs_mean", "adv_clamped_fraction", "traced_clip_fraction"} <= set(
        GRPOLambdaLoss(actor).out_keys)


def test_bf16_policy(actor):
    actor16, _ = _tiny_actor(dtype=torch.bfloat16)
    td = _batch(actor)
    td["log_probs", "full"] = td["log_probs", "full"].bfloat16()
    kw = dict(entropy_bonus=False, aggregation="prompt_mean")
    out_p = GRPOLoss(actor16, **kw)(td.clone())
    out_0 = GRPOLambdaLoss(actor16, style=None, clamp_min=None, **kw)(td.clone())
    _assert_same(out_0.loss_objective, out_p.loss_objective)
    out_l = GRPOLambdaLoss(actor16, style=STYLES[1], **kw)(td.clone())
    assert torch.isfinite(out_l.loss_objective)
    grads = torch.autograd.grad(out_l.loss_objective, _params(actor16))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kw,match", [
    (dict(aggregation="token-sum"), "aggregation must be one of"),
    (dict(aggregation="seq-mean-token-sum-norm"), "needs loss_scale_factor"),
    (dict(aggregation="token_mean", loss_scale_factor=4.0), "loss_scale_factor is only used"),
    (dict(style="recent"), "style must be"),
    (dict(clamp_min="x"), "clamp_min"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_grpolambdaloss_validation(actor, kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOLambdaLoss(actor, **kw)


def test_kl_mask_filtered_tokens_enter_the_trace_as_zero(actor):
    """KL-Mask: filtered tokens leave the loss (as in GRPOLoss) and contribute 0 to later z_t."""
    td = _batch(actor, noise=0.4)
    thr = 0.02
    style = STYLES[0]
    loss_fn = GRPOLambdaLoss(actor, style=style, clamp_min=-0.1, entropy_bonus=False, kl_mask_threshold=thr)
    out = loss_fn(td.clone())
    cur, old, mask = _dist_logp(loss_fn, td)  # [B, T]
    x = torch.where(mask, cur - torch.where(mask, old, torch.zeros(())), torch.zeros(()))  # [B, T]
    keep = 0.5 * x.detach() ** 2 <= thr  # [B, T]
    assert (mask & ~keep).any() and (mask & keep).any()  # the filter is active on this batch
    z = F.eligibility_trace(torch.where(keep, x, torch.zeros(())), mask, style)  # positions: all of mask
    A = td["advantage"].reshape(-1, 1).clamp_min(-0.1)  # [B, 1]
    per_tok, clipped = clipped_surrogate(z, A, 0.2)
    expect = aggregate(per_tok, mask & keep, "token-mean")
    _assert_same(out.loss_objective, expect)
    zm = torch.where(mask & keep, z, torch.zeros(())).detach()
    _assert_same(out.trace_abs_mean, zm.abs().sum() / (mask & keep).sum())
    _assert_same(out.traced_clip_fraction, (clipped & mask & keep).sum() / (mask & keep).sum())
    for a, b in zip(torch.autograd.grad(out.loss_objective, _params(actor)),
                    torch.autograd.grad(expect, _params(actor))):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)


# ============================================================================ TorchRL: styles, selection, credit
def test_objective_matches_parent_at_clip_edges():
    """The one-clamp PPO objective == the parent's stacked min: values, clip fraction and gradients,
    including log-weights exactly at the bounds, zero / negative advantages and per-token advantages."""
    ours = GRPOLambdaLoss(None, style=None, clamp_min=None, clip_epsilon=(0.2, 0.28))
    parent = GRPOLoss(None, clip_epsilon=(0.2, 0.28))
    lo, hi = (b.item() for b in parent._clip_bounds)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        base = torch.tensor([lo, hi, lo - 0.3, hi + 0.3, 0.0, lo + 1e-3, hi - 1e-3, -2.0, 2.0])
        lw = torch.cat([base, 0.5 * torch.randn(40, generator=g)]).to(dtype)  # [T]
        B, T = 6, lw.numel()
        lw = lw.expand(B, T).unsqueeze(-1).contiguous()  # [B, T, 1]
        for adv in (torch.tensor([1.0, -1.0, 0.0, -0.0, 0.3, -2.5]).reshape(B, 1, 1),
                    torch.randn(B, T, 1, generator=g)):
            a1 = lw.detach().clone().requires_grad_(True)
            a2 = lw.detach().clone().requires_grad_(True)
            l_o, cf_o = ours._compute_policy_objective(a1, adv)
            l_p, cf_p = parent._compute_policy_objective(a2, adv)
            assert l_o.dtype == l_p.dtype and l_o.shape == l_p.shape
            assert torch.equal(l_o, l_p) and torch.equal(cf_o, cf_p)
            w = torch.randn(l_o.shape, generator=g, dtype=l_o.dtype)
            g_o, = torch.autograd.grad(l_o, a1, w)
            g_p, = torch.autograd.grad(l_p, a2, w)
            assert torch.equal(g_o, g_p), dtype


NEW_CASES = [(NEW_STYLES[0], "token_mean", "token-mean"), (NEW_STYLES[1], "prompt_mean", "seq-mean-token-mean"),
             (NEW_STYLES[3], "prompt_mean", "seq-mean-token-mean"), (NEW_STYLES[3], "seq-mean-token-sum",
                                                                    "seq-mean-token-sum")]


@pytest.mark.parametrize("style,agg_rl,agg_plain", NEW_CASES, ids=["norm-token", "both-norm-prompt", "gspo-prompt",
                                                                   "gspo-seqsum"])
def test_grpolambdaloss_new_styles_equal_plain_loss(actor, style, agg_rl, agg_plain):
    td = _batch(actor, two_runs=style.style == "sequence", per_token_adv=agg_rl == "seq-mean-token-sum")
    kw_rl = dict(masking_strategy="rlhf") if style.style == "sequence" else {}
    loss_fn = GRPOLambdaLoss(actor, style=style, clamp_min=-0.1, entropy_bonus=False, aggregation=agg_rl, **kw_rl)
    out = loss_fn(td.clone())
    cur, old, mask = _dist_logp(loss_fn, td)
    loss, m = grpo_lambda_loss(cur, old.detach(), td["advantage"].squeeze(-1), mask, style, clamp_min=-0.1,
                               aggregation=agg_plain)
    _assert_same(out.loss_objective.reshape(()), loss)
    _assert_same(out.trace_abs_mean, m["trace_abs_mean"])
    for a, b in zip(torch.autograd.grad(out.loss_objective, _params(actor)), torch.autograd.grad(loss, _params(actor))):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)


def _prefix_batch_torchrl(actor):
    """_batch with the first two response tokens shared by every row, rewards [B, 1, 1] (2 groups of 3)."""
    td = _batch(actor)
    tokens = td["tokens", "full"].clone()  # [B, T]
    tokens[:, P_COLS: P_COLS + 2] = tokens[0, P_COLS: P_COLS + 2]
    td["tokens", "full"] = tokens
    resp = td["masks", "all_attention_mask"].clone()  # [B, T]
    resp[:, :P_COLS] = False
    td["resp_mask"] = resp
    td["reward"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]).reshape(6, 1, 1)
    del td["advantage"]
    return td


def test_prefix_td_feeds_grpoloss_and_grpolambdaloss(actor):
    from creditlib.modules import PrefixGAE, credit_pipeline

    td = _prefix_batch_torchrl(actor)
    mod = PrefixGAE(group_size=3, tokens_key=("tokens", "full"), mask_key="resp_mask", keepdim=True)
    td = mod(td)
    adv = td["advantage"]  # [B, T, 1]
    assert adv.shape == (6, P_COLS + R_COLS, 1) and (adv[~td["resp_mask"]] == 0).all()
    # TorchRL's own GRPOLoss takes the per-token advantages
    parent = GRPOLoss(actor, entropy_bonus=False)
    out_p = parent(td.clone())
    cur, old, mask = _dist_logp(parent, td)
    assert torch.equal(mask, td["resp_mask"])  # the loss mask is the response: positions agree
    loss, _ = grpo_lambda_loss(cur, old, adv.squeeze(-1), mask, None, clamp_min=None)
    _assert_same(out_p.loss_objective, loss)
    # and GRPOLambdaLoss, from the credit registry: pipeline + loss from one name
    td2 = credit_pipeline("prefix-gae-clamp", group_size=3, tokens_key=("tokens", "full"), mask_key="resp_mask",
                          keepdim=True)(_prefix_batch_torchrl(actor))
    torch.testing.assert_close(td2["advantage"], adv.clamp_min(-0.1))
    loss_fn = GRPOLambdaLoss.from_credit("prefix-gae-clamp", actor, entropy_bonus=False)
    assert loss_fn.style is None and loss_fn.clamp_min == -0.1 and loss_fn.select_key is None
    out = loss_fn(td2.clone())
    loss2, _ = grpo_lambda_loss(cur, old, adv.squeeze(-1), mask, None, clamp_min=-0.1)
    _assert_same(out.loss_objective, loss2)
    for a, b in zip(torch.autograd.grad(out.loss_objective, _params(actor)),
                    torch.autograd.grad(loss2, _params(actor))):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg_rl,agg_plain", [("token_mean", "token-mean"), ("prompt_mean", "seq-mean-token-mean"),
                                              ("seq-mean-token-sum", "seq-mean-token-sum")])
def test_select_key_equals_plain_loss_mask(actor, agg_rl, agg_plain):
    td = _batch(actor)
    loss_fn = GRPOLambdaLoss(actor, style=STYLES[1], entropy_bonus=False, aggregation=agg_rl, select_key="sel")
    cur, old, mask = _dist_logp(loss_fn, td)
    ent = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))
    sel = F.entropy_mask(ent, mask, 0.4)  # [B, T]
    td["sel"] = sel.unsqueeze(-1)  # [B, T, 1] is accepted too
    out = loss_fn(td.clone())
    loss, _ = grpo_lambda_loss(cur, old, td["advantage"].squeeze(-1), mask, STYLES[1], loss_mask=sel,
                               aggregation=agg_plain)
    _assert_same(out.loss_objective.reshape(()), loss)
    for a, b in zip(torch.autograd.grad(out.loss_objective, _params(actor)), torch.autograd.grad(loss, _params(actor))):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)
    # from the registry: entropy-80-20 reads the pipeline's selection key
    lf = GRPOLambdaLoss.from_credit("entropy-80-20", actor, select_key="sel", entropy_bonus=False, aggregation=agg_rl)
    assert lf.select_key == "sel" and lf.style is None and lf.clamp_min is None
    with pytest.raises(ValueError, match="select_key 'nope'"):
        GRPOLambdaLoss(actor, select_key="nope")(td.clone())
    td["bad"] = sel.float()
    with pytest.raises(ValueError, match="bool"):
        GRPOLambdaLoss(actor, select_key="bad")(td.clone())


def test_from_credit_every_method_and_one_clamp_rule(actor):
    from creditlib.credit import get_credit, list_credits

    for name in list_credits():
        m = get_credit(name)
        lf = GRPOLambdaLoss.from_credit(name, actor)
        assert lf.style == m.trace and lf.clamp_min == m.clamp_min
    with pytest.raises(ValueError, match="comes from the credit method"):
        GRPOLambdaLoss.from_credit("grpo", actor, clamp_min=-0.2)
    with pytest.raises(ValueError, match="did you mean"):
        GRPOLambdaLoss.from_credit("grpo-lamda", actor)
    with pytest.raises(ValueError, match="clamp_min must be None or a finite float <= 0"):
        GRPOLambdaLoss(actor, clamp_min=0.1)


class _GivenLogProbs(torch.nn.Module):
    """An actor whose distribution returns given log-probs (GRPOLoss reads ``.mask`` and ``.log_prob``)."""

    in_keys = [("tokens", "full")]

    def __init__(self, logp, mask):
        super().__init__()
        self.logp, self.mask = logp, mask

    def get_dist(self, tensordict, **kwargs):
        return self

    _get_sft_dist = get_dist

    def log_prob(self, action):
        return self.logp


@pytest.mark.parametrize("B,T", [(0, 6), (3, 0)])
def test_grpolambdaloss_empty_batch_keeps_the_graph(B, T):
    logp = torch.zeros(B, T, requires_grad=True)
    td = TensorDict({"tokens": {"full": torch.zeros(B, T, dtype=torch.long)}, "log_probs": {"full": torch.zeros(B, T)},
                     "advantage": torch.zeros(B, 1, 1)}, batch_size=[B])
    actor = _GivenLogProbs(logp, torch.ones(B, T, dtype=torch.bool))
    for style in (STYLES[0], NEW_STYLES[3]):
        out = GRPOLambdaLoss(actor, style=style, entropy_bonus=False)(td.clone())
        assert out.loss_objective.item() == 0.0 and out.adv_clamped_fraction.item() == 0.0
        out.loss_objective.backward()
        assert logp.grad is not None and logp.grad.shape == (B, T)
