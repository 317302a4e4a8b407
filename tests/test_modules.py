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
        ClampNegative(min=-0.1),
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
    with pytest.raises(ValueError, match="min"):
        ClampNegative(min=0.5)
    with pytest.raises(ValueError, match="min"):
        ClampNegative(min=float("nan"))


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
