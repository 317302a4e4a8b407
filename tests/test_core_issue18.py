"""Issue 18, core side: red-team fixes, one vocabulary and one validator, one registration per method."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import creditlib.functional as F
from creditlib import DecayStyle
from creditlib.ops.prefix.naive import prefix_td_naive
from creditlib.credit import (Advantage, CreditMethod, _REGISTRY, get_credit, list_credits, normalize_name,
                              register_credit)
from creditlib.losses import clipped_surrogate, grpo_lambda_loss

from .conftest import available_backends

tensordict = pytest.importorskip("tensordict")
from tensordict import TensorDict  # noqa: E402

import creditlib.modules as M  # noqa: E402


@pytest.fixture
def registry_snapshot():
    """Registrations made by a test are removed afterwards."""
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


def _prefix_batch(G=4, K=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 3, (K * G, T), generator=g)  # [B, T] small vocabulary: shared prefixes
    mask = torch.ones(K * G, T, dtype=torch.bool)  # [B, T]
    mask[1, 5:] = False
    mask[4, :2] = False  # left padding in one row
    rewards = torch.randint(0, 2, (K * G,), generator=g).double()  # [B]
    return tokens, mask, rewards, G


# ============================================================================ 1. TraceAdvantage with T = 1
@pytest.mark.parametrize("mode", ["log_weight", "credit"])
def test_trace_advantage_T1_keeps_rows_apart(mode):
    lp = torch.tensor([[0.1], [0.2], [0.3], [0.4]])  # [B, 1]
    td = TensorDict(log_prob=lp, old_log_prob=torch.zeros(4, 1), advantage=torch.tensor([1.0, -1.0, 2.0, 0.5]),
                    mask=torch.ones(4, 1, dtype=torch.bool), batch_size=[4])
    out = M.TraceAdvantage(DecayStyle("recent", lam=0.99), mode=mode)(td)
    key = "traced_log_weight" if mode == "log_weight" else "traced_advantage"
    want = lp if mode == "log_weight" else td["advantage"][:, None]  # one token: z = x, credit = A
    assert out[key].shape == (4, 1)
    torch.testing.assert_close(out[key], want)
    # [B, T, 1] masks still lose their trailing dim
    td["mask"] = torch.ones(4, 1, 1, dtype=torch.bool)
    assert M.TraceAdvantage(DecayStyle("recent", lam=0.99), mode=mode)(td)[key].shape == (4, 1)


# ============================================================================ 2. integer masks
def test_integer_masks_functional():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    mb = torch.rand(3, 6) > 0.3  # [B, T] bool
    style = DecayStyle("recent", lam=0.9)
    for dt in (torch.int64, torch.int32, torch.uint8, torch.int8):
        mi = mb.to(dt)
        assert torch.equal(F.eligibility_trace(x, mi, style), F.eligibility_trace(x, mb, style))
        assert torch.equal(F.traced_credit(x[:, 0], mi, style), F.traced_credit(x[:, 0], mb, style))
        e = torch.rand(3, 6)
        assert torch.equal(F.entropy_mask(e, mi, 0.5), F.entropy_mask(e, mb, 0.5))
    mi2 = mb.long() * 7  # nonzero = valid, as mask.bool()
    assert torch.equal(F.eligibility_trace(x, mi2, style), F.eligibility_trace(x, mb, style))
    tokens, mask, r, G = _prefix_batch()
    assert torch.equal(F.prefix_td(tokens, mask.long(), r, G), F.prefix_td(tokens, mask, r, G))
    boundary = (tokens == 1) & mask
    assert torch.equal(F.prefix_td(tokens, mask.long(), r, G, boundary=boundary.long()),
                       F.prefix_td(tokens, mask, r, G, boundary=boundary))
    for fn in (lambda m: F.eligibility_trace(x, m, style), lambda m: F.entropy_mask(x, m, 0.5)):
        with pytest.raises(ValueError, match=r"mask.*\.bool\(\)"):
            fn(mb.float())


def test_integer_masks_modules_and_credit():
    tokens, mask, r, G = _prefix_batch()
    for name in ("prefix-gae-clamp", "grpo-lambda", "entropy-80-20"):
        ent = torch.rand(mask.shape)
        want = credit_pipe = M.credit_pipeline(name, group_size=G)(
            TensorDict(tokens=tokens, mask=mask, reward=r, entropy=ent, batch_size=[8]))
        got = M.credit_pipeline(name, group_size=G)(
            TensorDict(tokens=tokens, mask=mask.long(), reward=r, entropy=ent, batch_size=[8]))
        torch.testing.assert_close(got["advantage"], want["advantage"])
        if "entropy_mask" in credit_pipe.keys():
            assert torch.equal(got["entropy_mask"], want["entropy_mask"])
        m = get_credit(name)
        torch.testing.assert_close(m.advantages(r, mask.long(), tokens=tokens, group_size=G),
                                   m.advantages(r, mask, tokens=tokens, group_size=G))
        assert m.loss_mask(mask.long(), ent).dtype == torch.bool
    td = TensorDict(log_prob=torch.randn(8, 7), old_log_prob=torch.zeros(8, 7), mask=mask.long(), batch_size=[8])
    want = F.eligibility_trace(td["log_prob"], mask, DecayStyle("both", lam=0.9))
    out = M.TraceAdvantage(DecayStyle("both", lam=0.9), mode="log_weight")(td)
    torch.testing.assert_close(out["traced_log_weight"], want)


def test_integer_masks_loss():
    torch.manual_seed(0)
    B, T = 4, 9
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    adv = torch.randn(B, dtype=torch.float64)
    sel = torch.rand(B, T) > 0.5
    style = DecayStyle("recent", lam=0.95)
    lb, mb = grpo_lambda_loss(logp, old, adv, mask, style, loss_mask=sel)
    (gb,) = torch.autograd.grad(lb, logp)
    li, mi = grpo_lambda_loss(logp, old, adv, mask.long(), style, loss_mask=sel.to(torch.int32))
    (gi,) = torch.autograd.grad(li, logp)
    assert torch.equal(lb, li) and torch.equal(gb, gi)
    assert all(torch.equal(mb[k], mi[k]) for k in mb)
    with pytest.raises(ValueError, match=r"\.bool\(\)"):
        grpo_lambda_loss(logp, old, adv, mask.double(), style)


# ============================================================================ 3. -inf log-ratio
_STYLES = [None, DecayStyle("recent", lam=0.0), DecayStyle("recent", lam=0.99), DecayStyle("both", lam=0.9, eps=0.01),
           DecayStyle("recent", lam=0.9, normalize=True), DecayStyle("both", lam=0.5, normalize=True),
           DecayStyle("sequence")]


@pytest.mark.parametrize("backend", ["reference"] + available_backends())
@pytest.mark.parametrize("style", _STYLES, ids=str)
def test_neg_inf_log_ratio_keeps_loss_finite(style, backend):
    torch.manual_seed(0)
    B, T = 4, 8
    base = torch.randn(B, T, dtype=torch.float64) * 0.1 - 1.0
    base[1, 2] = float("-inf")  # a valid token the current policy gives probability 0
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    old = torch.full((B, T), -1.0, dtype=torch.float64)
    for adv in (torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64),
                torch.tensor([1.0, 1.0, 0.5, -0.5], dtype=torch.float64)):
        logp = base.clone().requires_grad_()
        loss, metrics = grpo_lambda_loss(logp, old, adv, mask, style, clamp_min=None, backend=backend)
        loss.backward()
        assert torch.isfinite(loss), (style, backend, adv)
        assert torch.isfinite(logp.grad).all(), (style, backend, adv)
        # the -inf token's own ratio is 0: clipped from below for A < 0, contributes 0 for A >= 0
        per_tok, _ = clipped_surrogate(torch.tensor([float("-inf")], dtype=torch.float64), adv[1:2])
        assert torch.isfinite(per_tok).all()
        assert torch.isfinite(metrics["ratio_mean"])


# ============================================================================ 4. prefix_td memory
def test_prefix_td_large_group_memory():
    """G = 1024, T = 16 in one group (used to ask for 8 GiB: float64 [K, G, G, G]). Peak RSS growth
    is measured in a fresh process (it was 165 MiB on the dev machine); the bound is generous."""
    code = textwrap.dedent("""
        import resource, torch
        import creditlib.functional as F
        torch.manual_seed(0)
        G, T = 1024, 16
        tok = torch.randint(0, 2, (G, T))
        mask = torch.ones(G, T, dtype=torch.bool)
        mask[::3, 12:] = False
        r = torch.randint(0, 2, (G,)).double()
        F.prefix_td(tok[:8], mask[:8], r[:8], 8)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        d = F.prefix_td(tok, mask, r, G)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ok = torch.allclose(d.sum(1), F.group_advantage(r, G, baseline="loo"))
        print((peak - base) / 1024, ok)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    mib, ok = out.stdout.split()
    assert ok == "True"  # rows sum to the RLOO advantage
    assert float(mib) < 1024, f"prefix_td G=1024 T=16 grew the peak RSS by {mib} MiB"


@pytest.mark.parametrize("G", [16, 33])
def test_prefix_td_larger_groups_match_trie_walk(G):
    g = torch.Generator().manual_seed(G)
    tokens = torch.randint(0, 2, (2 * G, 6), generator=g)  # [B, T] many ties in the common prefixes
    mask = torch.rand(2 * G, 6, generator=g) > 0.2
    r = torch.rand(2 * G, generator=g).double()
    torch.testing.assert_close(F.prefix_td(tokens, mask, r, G), prefix_td_naive(tokens, mask, r, G))
    ids = torch.randperm(2 * G, generator=g) % 3  # uneven groups
    torch.testing.assert_close(F.prefix_td(tokens, mask, r, group_ids=ids),
                               prefix_td_naive(tokens, mask, r, group_ids=ids))


# ============================================================================ 5. registry names
def test_registry_names_normalised_on_registration(registry_snapshot):
    m = register_credit(CreditMethod("My_Method", clamp_min=-0.2))
    assert m.name == "my-method" and "my-method" in list_credits() and "My_Method" not in list_credits()
    for alias in ("my-method", "My_Method", " MY-METHOD ", "my_method"):
        assert get_credit(alias) is m
    with pytest.raises(ValueError, match="already registered"):
        register_credit(CreditMethod(" grpo", clamp_min=-0.3))
    with pytest.raises(ValueError, match="already registered"):
        register_credit(CreditMethod("MY_METHOD", clamp_min=-0.3))
    register_credit(CreditMethod("my-method", clamp_min=-0.2))  # the same method again: fine
    new = register_credit(CreditMethod("MY_METHOD", clamp_min=-0.3), overwrite=True)
    assert get_credit("my-method") is new and new.clamp_min == -0.3
    assert normalize_name("  Prefix_GAE ") == "prefix-gae"
    with pytest.raises(ValueError, match="unknown credit method"):
        get_credit("   ")


# ============================================================================ 6. torch.compile(fullgraph=True)
@pytest.mark.slow
def test_group_advantage_compiles_fullgraph():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    fn = torch.compile(lambda r: F.group_advantage(r, 3, baseline="loo"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(r), F.group_advantage(r, 3, baseline="loo"))


@pytest.mark.slow
def test_prefix_td_compiles_fullgraph():
    tokens, mask, r, G = _prefix_batch()
    fn = torch.compile(lambda t, m, r: F.prefix_td(t, m, r, G), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(tokens, mask, r), F.prefix_td(tokens, mask, r, G))


@pytest.mark.slow
def test_entropy_mask_compiles_fullgraph():
    e, mask = torch.rand(4, 6), torch.rand(4, 6) > 0.2
    fn = torch.compile(lambda e, m: F.entropy_mask(e, m, 0.3), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(e, mask), F.entropy_mask(e, mask, 0.3))


def test_custom_ops_still_raise_on_bad_data():
    tokens, mask, r, G = _prefix_batch()
    r[3] = float("nan")
    with pytest.raises(ValueError, match=r"rewards\[3\]"):
        F.prefix_td(tokens, mask, r, G)
    e = torch.rand(mask.shape)
    e[0, 0] = float("inf")
    with pytest.raises(ValueError, match="entropy must be finite"):
        F.entropy_mask(e, mask, 0.5)


# ============================================================================ 7. deprecated names
def _warns_deprecated(match):
    return pytest.warns(DeprecationWarning, match=match)


def test_deprecated_names_warn_and_still_work():
    with _warns_deprecated("ClampNegative"):
        c = M.ClampNegative(min=-0.2)
    assert c.clamp_min == -0.2
    with _warns_deprecated("ClampNegative.min"):
        assert c.min == -0.2
    tokens, mask, r, G = _prefix_batch()
    td = TensorDict(tokens=tokens, mask=mask, reward=r, batch_size=[8])
    with _warns_deprecated("PrefixTD"):
        old = M.PrefixTD(G, gae_lam=0.9)
    with _warns_deprecated(r"PrefixGAE\(lam"), _warns_deprecated(r"PrefixGAE\(gamma"):
        old_kw = M.PrefixGAE(G, gamma=1.0, lam=0.9)
    new = M.PrefixGAE(G, gae_lam=0.9)
    assert isinstance(old, M.PrefixGAE)
    torch.testing.assert_close(old(td.clone())["advantage"], new(td.clone())["advantage"])
    torch.testing.assert_close(old_kw(td.clone())["advantage"], new(td.clone())["advantage"])
    with _warns_deprecated(r"CreditMethod\(lam"):
        m = CreditMethod("x", advantage="prefix_td", lam=0.9)
    assert m == CreditMethod("x", advantage="prefix_td", gae_lam=0.9)
    with _warns_deprecated(r"CreditMethod\.lam"):
        assert m.lam == 0.9
    with _warns_deprecated(r"CreditMethod\.gamma"):
        assert m.gamma == 1.0
    with _warns_deprecated(r"replace\(lam"):
        assert m.replace(lam=0.5).gae_lam == 0.5
    with _warns_deprecated("by position"):
        a = F.group_advantage(r, G, "none", "loo")
    torch.testing.assert_close(a, F.group_advantage(r, G, scale="none", baseline="loo"))
    with pytest.raises(TypeError):
        F.group_advantage(r, G, "none", "loo", 1e-4)
    from creditlib.losses import GRPOLambdaLoss

    with _warns_deprecated("trace_backend"):
        loss = GRPOLambdaLoss(None, trace_backend="torch")
    assert loss.backend == "torch"
    with _warns_deprecated("trace_backend"):
        assert loss.trace_backend == "torch"


def test_new_names_do_not_warn():
    tokens, mask, r, G = _prefix_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        M.ClampNegative(clamp_min=-0.1)
        M.ClampNegative(-0.1)  # positional, as recipes write it
        M.PrefixGAE(G, gae_gamma=1.0, gae_lam=0.95)
        m = CreditMethod("x", advantage="prefix_td", gae_lam=0.9)
        m.replace(gae_lam=0.5).summary()
        F.group_advantage(r, G, scale="none", baseline="loo")
        for name in list_credits():
            M.credit_pipeline(name, group_size=G)
            get_credit(name).summary()


def test_one_validator_one_message():
    """scale / baseline / groups / eps / style: the same checks and messages at every layer."""
    r = torch.rand(8).double()
    tokens, mask, _, G = _prefix_batch()
    for call in (lambda: F.group_advantage(r, 4, scale="mad"), lambda: F.prefix_td(tokens, mask, r, 4, scale="mad"),
                 lambda: M.CriticFreeTD(4, scale="mad"), lambda: M.PrefixGAE(4, scale="mad"),
                 lambda: CreditMethod("x", scale="mad")):
        with pytest.raises(ValueError, match=r"scale must be one of \('std', 'none'\), got 'mad'"):
            call()
    for call in (lambda: F.group_advantage(r, 4, baseline="max"), lambda: M.CriticFreeTD(4, baseline="max"),
                 lambda: CreditMethod("x", baseline="max")):
        with pytest.raises(ValueError, match=r"baseline must be one of \('mean', 'loo'\), got 'max'"):
            call()
    for call in (lambda: F.group_advantage(r), lambda: F.prefix_td(tokens, mask, r)):
        with pytest.raises(ValueError, match="exactly one of group_size or group_ids"):
            call()
    for call in (lambda: M.CriticFreeTD(), lambda: M.PrefixGAE()):
        with pytest.raises(ValueError, match="exactly one of group_size or group_id_key"):
            call()
    for call in (lambda: F.group_advantage(r, 4, eps=float("inf")), lambda: M.CriticFreeTD(4, eps=-1.0),
                 lambda: M.PrefixGAE(4, eps=float("nan")), lambda: F.prefix_td(tokens, mask, r, 4, eps=-1.0)):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            call()
    for call in (lambda: F.eligibility_trace(r[None], None, "recent"), lambda: M.TraceAdvantage("recent"),
                 lambda: grpo_lambda_loss(r[None], r[None], r[:1], torch.ones(1, 8, dtype=torch.bool), "recent")):
        with pytest.raises(ValueError, match="style must be a creditlib.DecayStyle"):
            call()


# ============================================================================ 8. one registration per method
def _cumulative_prefix(method, batch):
    """A new kind of advantage: the running sum of the prefix TD error (reward-to-go from the start)."""
    delta = F.prefix_td(batch.tokens, batch.mask, batch.rewards, batch.group_size, group_ids=batch.group_ids,
                        scale=method.scale)  # [B, T]
    return delta.cumsum(-1) * batch.mask  # [B, T]


def _entropy_weighted(method, batch):
    """A per-sequence kind that reads entropies: the group advantage times the mean valid entropy."""
    a = F.group_advantage(batch.rewards, batch.group_size, group_ids=batch.group_ids, scale=method.scale)  # [B]
    m = batch.mask.to(batch.entropy.dtype)  # [B, T]
    return a * ((batch.entropy * m).sum(-1) / m.sum(-1).clamp_min(1)).to(a.dtype)  # [B]


def test_one_registration_new_per_token_method(registry_snapshot):
    register_credit(CreditMethod("Cum_Prefix", advantage=Advantage("cum_prefix", _cumulative_prefix, per_token=True,
                                                                   needs_tokens=True),
                                 clamp_min=-0.5, trace=DecayStyle("recent", lam=0.9), description="test"))
    tokens, mask, r, G = _prefix_batch()
    want = (F.prefix_td(tokens, mask, r, G).cumsum(-1) * mask).clamp_min(-0.5)  # [B, T]
    m = get_credit("cum-prefix")
    assert m.per_token and m.needs_tokens and m.needs_mask and not m.needs_entropy
    # the plain-tensor path
    torch.testing.assert_close(m.advantages(r, mask, tokens=tokens, group_size=G), want)
    with pytest.raises(ValueError, match="needs tokens"):
        m.advantages(r, mask, group_size=G)
    with pytest.raises(ValueError, match="boundary"):
        m.advantages(r, mask, tokens=tokens, group_size=G, boundary=mask)
    # the TensorDict path, by name
    pipe = M.credit_pipeline("cum-prefix", group_id_key="gid", keepdim=True)
    assert [type(x).__name__ for x in pipe.module] == ["CreditAdvantage", "ClampNegative"]
    td = TensorDict(tokens=tokens, mask=mask.long(), reward=r[:, None], gid=torch.arange(8) // G, batch_size=[8])
    torch.testing.assert_close(pipe(td)["advantage"], want.unsqueeze(-1))
    # the verl estimator, by name (no verl needed for the plain function)
    from creditlib.integrations.verl import credit_advantage

    trl_rewards = torch.zeros(8, 7, dtype=torch.float64)
    trl_rewards[:, 0] = r
    adv, ret = credit_advantage(trl_rewards, mask.long(), [str(i // G) for i in range(8)], responses=tokens,
                                method="cum-prefix")
    torch.testing.assert_close(adv, want)
    # the loss reads the method's trace and clamp
    logp = torch.randn(8, 7, dtype=torch.float64)
    loss, _ = grpo_lambda_loss(logp, logp.detach(), adv, mask, m.trace, clamp_min=m.clamp_min)
    assert torch.isfinite(loss)


def test_one_registration_new_per_sequence_method_with_entropy(registry_snapshot):
    kind = Advantage("entropy_weighted", _entropy_weighted, needs_mask=True, needs_entropy=True)
    register_credit(CreditMethod("ent-weighted", advantage=kind, scale="none"))
    tokens, mask, r, G = _prefix_batch()
    ent = torch.rand(mask.shape, dtype=torch.float64)
    m = get_credit("ent-weighted")
    want = _entropy_weighted(m, type("B", (), dict(rewards=r, group_size=G, group_ids=None, mask=mask,
                                                    entropy=ent))())  # [B]
    torch.testing.assert_close(m.advantages(r, mask, group_size=G, entropy=ent), want)
    with pytest.raises(ValueError, match="needs entropy"):
        m.advantages(r, mask, group_size=G)
    td = TensorDict(mask=mask, reward=r, entropy=ent, batch_size=[8])
    out = M.credit_pipeline("ent-weighted", group_size=G)(td)
    torch.testing.assert_close(out["advantage"], want)
    from creditlib.integrations.verl import credit_advantage

    with pytest.raises(ValueError, match="entropies"):
        credit_advantage(torch.zeros(8, 7), mask, [str(i // G) for i in range(8)], method="ent-weighted")


def test_advantage_kind_validation():
    with pytest.raises(ValueError, match="callable"):
        Advantage("x", 3)
    with pytest.raises(ValueError, match="options"):
        Advantage("x", _cumulative_prefix, options=("lam",))
    kind = Advantage("x", _cumulative_prefix, per_token=True, needs_tokens=True)
    assert kind.needs_mask  # per-token kinds read the mask
    with pytest.raises(ValueError, match="baseline='loo' applies to advantage='group' only"):
        CreditMethod("y", advantage=kind, baseline="loo")
    bad = CreditMethod("y", advantage=Advantage("bad", lambda m, b: b.rewards[:2]))
    with pytest.raises(ValueError, match="returned shape"):
        bad.advantages(torch.rand(4), group_size=2)
