"""The TensorDict modules: composition, keys, shapes, and agreement with the functional API."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential

import creditlib
from creditlib import ClampNegative, CriticFreeTD, DecayStyle, TraceAdvantage
from creditlib import functional as F


def _batch(B=8, T=12, G=4):
    mask = torch.rand(B, T) < 0.8
    return TensorDict(
        reward=torch.randint(0, 2, (B,)).float(),
        mask=mask,
        log_prob=torch.randn(B, T),
        old_log_prob=torch.randn(B, T),
        batch_size=[B],
    ), G


def test_public_names():
    assert creditlib.TraceAdvantage is TraceAdvantage
    assert creditlib.functional is F
    with pytest.raises(AttributeError):
        creditlib.NoSuchThing  # noqa: B018


def test_sequential_pipeline_matches_functional():
    td, G = _batch()
    style = DecayStyle("both", lam=0.9, eps=0.02)
    pipe = TensorDictSequential(
        CriticFreeTD(group_size=G),
        ClampNegative(clamp_min=-0.1),
        TraceAdvantage(style, mode="credit"),
    )
    assert set(pipe.in_keys) == {"reward", "mask"}
    out = pipe(td.clone())
    adv = F.group_advantage(td["reward"], G).clamp_min(-0.1)  # [B]
    torch.testing.assert_close(out["advantage"], adv)
    torch.testing.assert_close(out["traced_advantage"], F.traced_credit(adv, td["mask"], style))
    assert out["traced_advantage"].shape == td["mask"].shape


def test_log_weight_mode_and_keepdim_and_nested_keys():
    td, _ = _batch()
    style = DecayStyle("recent", lam=0.95)
    td2 = TensorDict(batch_size=td.batch_size)
    td2["policy", "lp"] = td["log_prob"].unsqueeze(-1)  # [B, T, 1], TorchRL-style
    td2["policy", "old"] = td["old_log_prob"].unsqueeze(-1)
    td2["m"] = td["mask"].unsqueeze(-1)
    mod = TraceAdvantage(style, mode="log_weight", log_prob_key=("policy", "lp"),
                         old_log_prob_key=("policy", "old"), mask_key="m", out_key=("policy", "z"), keepdim=True)
    out = mod(td2)
    want = F.eligibility_trace(td["log_prob"] - td["old_log_prob"], td["mask"], style)
    torch.testing.assert_close(out["policy", "z"], want.unsqueeze(-1))
    assert mod.out_keys == [("policy", "z")]


def test_per_token_and_singleton_advantages():
    B, T = 4, 9
    m = torch.rand(B, T) < 0.7
    style = DecayStyle("recent", lam=0.8, eps=0.1)
    a_tok = torch.randn(B, T)
    for adv, want_in in [(a_tok, a_tok), (a_tok[..., None], a_tok), (a_tok[:, :1], a_tok[:, 0]),
                         (a_tok[:, 0], a_tok[:, 0])]:
        td = TensorDict(advantage=adv, mask=m, batch_size=[B])
        out = TraceAdvantage(style)(td)
        torch.testing.assert_close(out["traced_advantage"], F.traced_credit(want_in, m, style))


def test_critic_free_td_group_ids_and_shapes():
    r = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.5]])  # [B, 1] like TorchRL
    gid = torch.tensor([0, 1, 0, 1, 0, 1])
    td = TensorDict(reward=r, gid=gid, batch_size=[6])
    out = CriticFreeTD(group_id_key="gid", baseline="loo", scale="none")(td)
    assert out["advantage"].shape == (6, 1)
    torch.testing.assert_close(out["advantage"][:, 0],
                               F.group_advantage(r[:, 0], group_ids=gid, baseline="loo", scale="none"))


def test_clamp_negative_writes_mask_and_validates():
    td = TensorDict(advantage=torch.tensor([-1.0, -0.05, 0.3]), batch_size=[3])
    out = ClampNegative(clamped_key="clamped", out_key="adv_c")(td)
    assert torch.equal(out["adv_c"], torch.tensor([-0.1, -0.05, 0.3]))
    assert torch.equal(out["clamped"], torch.tensor([True, False, False]))
    assert torch.equal(out["advantage"], torch.tensor([-1.0, -0.05, 0.3]))  # input untouched
    with pytest.raises(ValueError, match="clamp_min"):
        ClampNegative(clamp_min=0.5)
    with pytest.raises(ValueError, match="clamp_min"):
        ClampNegative(clamp_min=float("nan"))


def test_module_errors_name_the_problem():
    with pytest.raises(ValueError, match="group_size"):
        CriticFreeTD()
    with pytest.raises(ValueError, match="group_size"):
        CriticFreeTD(group_size=0)
    with pytest.raises(ValueError, match="mode"):
        TraceAdvantage(DecayStyle(), mode="sideways")
    with pytest.raises(ValueError, match="style"):
        TraceAdvantage("recent")
    td = TensorDict(reward=torch.rand(6), batch_size=[6])
    with pytest.raises(ValueError, match="group_size"):
        CriticFreeTD(group_size=4)(td)
    td = TensorDict(advantage=torch.randn(3, 5, 2), mask=torch.ones(3, 5, dtype=torch.bool), batch_size=[3])
    with pytest.raises(ValueError, match="advantage"):
        TraceAdvantage(DecayStyle())(td)
    td = TensorDict(advantage=torch.randn(3), mask=torch.ones(3, 5), batch_size=[3])
    with pytest.raises(ValueError, match="mask"):
        TraceAdvantage(DecayStyle())(td)


def test_gradients_flow_through_log_weight_module():
    td, _ = _batch()
    td["log_prob"].requires_grad_(True)
    out = TraceAdvantage(DecayStyle("both", lam=0.9), mode="log_weight")(td)
    out["traced_log_weight"].sum().backward()
    g = td["log_prob"].grad
    assert torch.isfinite(g).all() and (g[~td["mask"]] == 0).all() and (g[td["mask"]] != 0).any()


# ============================================================================ PrefixTD, EntropySelect, pipelines
from creditlib import modules as M  # noqa: E402
from creditlib.credit import get_credit, list_credits  # noqa: E402


def _prefix_td_batch(B=8, T=10, G=4, seed=0):
    """Completions with shared prefixes (vocab of 3), left padding, a two-run row and an empty row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 3, (B, T), generator=g)  # [B, T]
    tokens[:, :2] = 1
    mask = torch.ones(B, T, dtype=torch.bool)  # [B, T]
    mask[0, :3] = False
    mask[2, 4:6] = False
    mask[5] = False
    reward = torch.randint(0, 2, (B,), generator=g).float()  # [B]
    return tokens, mask, reward, G


def test_prefix_td_module_matches_functional():
    tokens, mask, reward, G = _prefix_td_batch()
    style = DecayStyle("recent", gamma=0.9, lam=0.8)
    want = F.traced_credit(F.prefix_td(tokens, mask, reward, G, scale="none"), mask, style)  # [B, T]
    td = TensorDict(tokens=tokens, mask=mask, reward=reward, batch_size=[8])
    out = M.PrefixGAE(G, scale="none", gae_gamma=0.9, gae_lam=0.8)(td)
    torch.testing.assert_close(out["advantage"], want)
    assert out["advantage"].shape == (8, 10)
    # TorchRL-style shapes and nested keys: reward [B, 1, 1], mask [B, T, 1], group ids, keepdim
    gid = torch.arange(8) // G
    td2 = TensorDict({("tok", "full"): tokens, "m": mask.unsqueeze(-1), "r": reward.reshape(8, 1, 1), "gid": gid},
                     batch_size=[8])
    mod = M.PrefixGAE(group_id_key="gid", scale="none", gae_gamma=0.9, gae_lam=0.8, tokens_key=("tok", "full"),
                     mask_key="m", reward_key="r", advantage_key=("out", "adv"), keepdim=True)
    assert set(mod.in_keys) == {("tok", "full"), "m", "r", "gid"} and mod.out_keys == [("out", "adv")]
    out2 = mod(td2)
    torch.testing.assert_close(out2["out", "adv"], want.unsqueeze(-1))
    # step-level variant: boundary key passed through
    boundary = (tokens == 2) & mask
    td3 = TensorDict(tokens=tokens, mask=mask, reward=reward, b=boundary, batch_size=[8])
    out3 = M.PrefixGAE(G, boundary_key="b")(td3)
    torch.testing.assert_close(out3["advantage"], F.traced_credit(
        F.prefix_td(tokens, mask, reward, G, boundary=boundary), mask, DecayStyle("recent", gamma=1.0, lam=1.0)))


def test_prefix_td_module_errors():
    with pytest.raises(ValueError, match="group_size or group_id_key"):
        M.PrefixGAE()
    with pytest.raises(ValueError, match="group_size"):
        M.PrefixGAE(0)
    with pytest.raises(ValueError, match="scale"):
        M.PrefixGAE(4, scale="mad")
    with pytest.raises(ValueError, match="gae_lam"):
        M.PrefixGAE(4, gae_lam=1.5)
    with pytest.raises(ValueError, match="eps"):
        M.PrefixGAE(4, eps=float("nan"))
    tokens, mask, reward, G = _prefix_td_batch()
    td = TensorDict(tokens=tokens[:, :5], mask=mask, reward=reward, batch_size=[8])
    with pytest.raises(ValueError, match="tokens"):
        M.PrefixGAE(G)(td)
    td = TensorDict(tokens=tokens, mask=mask.float(), reward=reward, batch_size=[8])
    with pytest.raises(ValueError, match=r"mask.*\.bool\(\)"):
        M.PrefixGAE(G)(td)


def test_entropy_select_module():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 40, generator=g) > 0.3  # [B, T]
    ent = torch.rand(6, 40, generator=g)  # [B, T]
    td = TensorDict(entropy=ent.unsqueeze(-1), mask=mask, batch_size=[6])
    out = M.EntropySelect(0.25)(td)
    want = F.entropy_mask(ent, mask, 0.25)
    assert out["entropy_mask"].dtype == torch.bool and torch.equal(out["entropy_mask"], want)
    q = torch.quantile(ent[mask], 0.75)
    assert torch.equal(want, mask & (ent >= q))  # the definition
    out = M.EntropySelect(1.0, out_key="sel", keepdim=True)(td)
    assert torch.equal(out["sel"], mask.unsqueeze(-1))
    for bad in (0.0, 1.2, float("nan"), True):
        with pytest.raises(ValueError, match="quantile"):
            M.EntropySelect(bad)


def test_clamp_negative_one_rule():
    assert ClampNegative(clamp_min=0).clamp_min == 0.0 and ClampNegative(-1).clamp_min == -1.0
    for bad in (0.1, float("inf"), None, "x", True):
        with pytest.raises(ValueError, match="clamp_min"):
            ClampNegative(clamp_min=bad)


@pytest.mark.parametrize("name", list_credits())
def test_credit_pipeline_writes_the_method_advantages(name):
    tokens, mask, reward, G = _prefix_td_batch(seed=3)
    ent = torch.rand(8, 10)
    m = get_credit(name)
    td = TensorDict(tokens=tokens, mask=mask, reward=reward, entropy=ent, batch_size=[8])
    kw, keys = {}, {}
    if m.needs_states:  # anchor-state compares the turns that start from one state: give each turn a state
        K = int(F.turn_ids_from_mask(mask).max()) + 1
        td["state_ids"] = kw["state_ids"] = (torch.arange(8)[:, None] + torch.arange(max(K, 1))) % 3  # [8, K]
        keys["state_ids_key"] = "state_ids"
    out = M.credit_pipeline(name, group_size=G, **keys)(td)
    want = m.advantages(reward, mask, tokens=tokens, group_size=G, **kw)
    torch.testing.assert_close(out["advantage"], want)
    if m.entropy_quantile is not None:
        assert torch.equal(out["entropy_mask"], m.loss_mask(mask, ent))
    else:
        assert "entropy_mask" not in out.keys()
    kinds = [type(x).__name__ for x in M.credit_pipeline(m, group_size=G).module]
    builtin = {"group": "CriticFreeTD", "prefix_td": "PrefixGAE"}  # other kinds: the generic module
    assert kinds[0] == builtin.get(m.advantage_kind.name, "CreditAdvantage")
    assert ("ClampNegative" in kinds) == (m.clamp_min is not None)


def test_credit_pipeline_errors():
    with pytest.raises(ValueError, match="did you mean"):
        M.credit_pipeline("prefix-gea", group_size=4)
    with pytest.raises(ValueError, match="boundary_key"):
        M.credit_pipeline("grpo", group_size=4, boundary_key="b")
    with pytest.raises(ValueError, match="group_size"):
        M.credit_pipeline("prefix-gae")
