"""The credit-method registry (creditlib.credit): names, validation, and each method's advantages
and loss mask against plain definitions written out here (loops over rows, groups and tokens)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from creditlib import DecayStyle
from creditlib import functional as F
from creditlib.credit import CreditMethod, get_credit, list_credits, register_credit

BUILTINS = ["grpo", "clamp", "grpo-lambda", "grpo-lambda-norm", "gspo", "prefix-gae", "prefix-gae-clamp",
            "prefix-gae-lambda", "entropy-80-20", "treerl"]


# ============================================================================ plain definitions
def _groups(B, group_size=None, group_ids=None):
    """Row indices of each group, in row order."""
    ids = torch.arange(B) // group_size if group_ids is None else group_ids
    out = {}
    for i in range(B):
        out.setdefault(int(ids[i]), []).append(i)
    return list(out.values())


def _std(vals):
    n = len(vals)
    if n < 2:
        return 0.0
    m = sum(vals) / n
    return (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5


def ref_group_adv(r, group_size=None, group_ids=None, scale="std", baseline="mean", eps=1e-4):
    """GRPO / RLOO advantage, one group at a time (float64 Python floats)."""
    r = [float(v) for v in r]
    out = [0.0] * len(r)
    for rows in _groups(len(r), group_size, group_ids):
        vals = [r[i] for i in rows]
        s = _std(vals) + eps if scale == "std" else 1.0
        for i in rows:
            if baseline == "mean":
                b = sum(vals) / len(vals)
            else:
                others = [r[j] for j in rows if j != i]
                b = sum(others) / len(others) if others else r[i]
            out[i] = (r[i] - b) / s
    return torch.tensor(out, dtype=torch.float64)


def _lcp(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def ref_prefix_td(tokens, mask, r, group_size=None, group_ids=None, scale="std", eps=1e-4):
    """docs/design.md section 4 (leave-one-out prefix-tree TD), written out: V_i(k) from the other members that share the prefix."""
    B, T = tokens.shape
    out = torch.zeros(B, T, dtype=torch.float64)  # [B, T]
    r = [float(v) for v in r]
    for rows in _groups(B, group_size, group_ids):
        if len(rows) < 2:
            continue
        s = _std([r[i] for i in rows]) + eps if scale == "std" else 1.0
        seqs = {i: [int(t) for t in tokens[i][mask[i]]] for i in rows}
        for i in rows:
            others = [j for j in rows if j != i]
            lcp = {j: _lcp(seqs[i], seqs[j]) for j in others}
            L = max(lcp.values())
            n = len(seqs[i])

            def V(k):
                if k == n:
                    return r[i]
                share = [r[j] for j in others if lcp[j] >= min(k, L)]
                return sum(share) / len(share)
            cols = mask[i].nonzero().flatten().tolist()
            for k, c in enumerate(cols):
                out[i, c] = (V(k + 1) - V(k)) / s
    return out


def ref_gae(delta, mask, gamma, lam):
    """A_k = delta_k + gamma * lam * A_{k+1} over the valid tokens of each row (reverse loop)."""
    out = torch.zeros_like(delta, dtype=torch.float64)
    for i in range(delta.shape[0]):
        acc = 0.0
        for c in reversed(mask[i].nonzero().flatten().tolist()):
            acc = float(delta[i, c]) + gamma * lam * acc
            out[i, c] = acc
    return out


def ref_entropy_mask(entropy, mask, quantile):
    if not mask.any():
        return torch.zeros_like(mask)
    q = torch.quantile(entropy[mask].float(), 1 - quantile)
    return mask & (entropy >= q)


# ============================================================================ data
def _prefix_batch(G=4, n_groups=3, T=14, seed=0, vocab=3):
    """Groups whose completions share prefixes (small vocab), with awkward masks.

    Row layouts: left padding, right padding, two runs, an all-masked row, a duplicate of another
    row and a row that is a prefix of another, in one batch."""
    g = torch.Generator().manual_seed(seed)
    B = G * n_groups
    tokens = torch.randint(0, vocab, (B, T), generator=g)  # [B, T]
    tokens[:, :3] = tokens[0, :3]  # a shared opening in every group
    mask = torch.ones(B, T, dtype=torch.bool)  # [B, T]
    mask[0, :4] = False                     # left padding
    mask[1, T - 5:] = False                 # right padding
    mask[2, 5:8] = False                    # two runs
    mask[5] = False                         # all masked
    tokens[6] = tokens[7]                   # identical completions
    mask[6] = mask[7]
    tokens[9] = tokens[8]                   # row 9 is a prefix of row 8
    mask[9, T - 6:] = False
    rewards = torch.randint(0, 2, (B,), generator=g).double()  # [B]
    rewards[B - G:] = torch.rand(G, generator=g, dtype=torch.float64)  # real-valued rewards in one group
    return tokens, mask, rewards, G


# ============================================================================ registry
def test_builtins_registered_with_descriptions():
    names = list_credits()
    assert names[: len(BUILTINS)] == BUILTINS
    for n in BUILTINS:
        m = get_credit(n)
        assert isinstance(m, CreditMethod) and m.name == n
        assert m.description and "\n" not in m.description
    assert get_credit("grpo-lambda").trace == DecayStyle("recent", gamma=1.0, lam=0.99)
    assert get_credit("grpo-lambda").clamp_min == -0.1
    assert get_credit("grpo-lambda-norm").trace.normalize and get_credit("grpo-lambda-norm").clamp_min == -0.1
    assert get_credit("gspo").trace.style == "sequence"
    pg = get_credit("prefix-gae")
    assert pg.per_token and pg.needs_tokens and (pg.gae_gamma, pg.gae_lam) == (1.0, 1.0)
    assert get_credit("prefix-gae-lambda").gae_lam == 0.95 and get_credit("prefix-gae-clamp").clamp_min == -0.1
    assert get_credit("entropy-80-20").entropy_quantile == 0.2 and get_credit("entropy-80-20").needs_entropy
    assert get_credit("grpo").trace is None and not get_credit("grpo").per_token
    assert get_credit("PREFIX_GAE") is get_credit("prefix-gae")  # case and _ forgiven
    assert get_credit("grpo").summary().startswith("grpo: advantage=group")


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean 'grpo-lambda'"):
        get_credit("grpo-lamda")
    with pytest.raises(ValueError, match="unknown credit method 'zzz'.*Known: grpo, clamp"):
        get_credit("zzz")
    with pytest.raises(ValueError, match="string"):
        get_credit(3)


def test_register_one_call_and_overwrite_rules():
    from creditlib import credit as C

    m = CreditMethod("test-rloo-lambda", baseline="loo", clamp_min=-0.2, trace=DecayStyle("both", lam=0.9),
                     description="test method")
    try:
        assert register_credit(m) is m
        assert get_credit("test-rloo-lambda") is m and "test-rloo-lambda" in list_credits()
        register_credit(CreditMethod("test-rloo-lambda", baseline="loo", clamp_min=-0.2,
                                     trace=DecayStyle("both", lam=0.9), description="test method"))  # same: fine
        with pytest.raises(ValueError, match="already registered"):
            register_credit(m.replace(clamp_min=-0.3))
        m2 = register_credit(m.replace(clamp_min=-0.3), overwrite=True)
        assert get_credit("test-rloo-lambda").clamp_min == -0.3 and m2.clamp_min == -0.3
        with pytest.raises(ValueError, match="CreditMethod"):
            register_credit("grpo")
    finally:
        C._REGISTRY.pop("test-rloo-lambda", None)
    assert "test-rloo-lambda" not in list_credits()


@pytest.mark.parametrize("kw,match", [
    (dict(advantage="critic"), "advantage must be one of"),
    (dict(scale="mad"), "scale must be one of"),
    (dict(baseline="median"), "baseline must be one of"),
    (dict(advantage="prefix_td", gae_gamma=1.5), "gae_gamma"),
    (dict(advantage="prefix_td", gae_lam=-0.1), "gae_lam"),
    (dict(gae_lam=0.9), r"advantage kinds \['prefix_td', 'prefix_turn'\] only"),
    (dict(advantage="prefix_td", baseline="loo"), "baseline='loo'"),
    (dict(clamp_min=0.1), "clamp_min must be None or a finite float <= 0"),
    (dict(clamp_min=float("nan")), "clamp_min"),
    (dict(clamp_min=True), "clamp_min"),
    (dict(trace="recent"), "trace must be a creditlib.DecayStyle"),
    (dict(entropy_quantile=0.0), "entropy_quantile"),
    (dict(entropy_quantile=1.5), "entropy_quantile"),
    (dict(description=3), "description"),
])
def test_method_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        CreditMethod("x", **kw)


def test_name_and_replace_validate():
    with pytest.raises(ValueError, match="name"):
        CreditMethod("")
    with pytest.raises(ValueError, match="clamp_min"):
        get_credit("clamp").replace(clamp_min=0.5)
    m = get_credit("prefix-gae").replace(name="p2", gae_lam=0.5)
    assert m.gae_lam == 0.5 and get_credit("prefix-gae").gae_lam == 1.0  # frozen original untouched
    assert CreditMethod("y", clamp_min=0).clamp_min == 0.0  # 0 is allowed (clamps every negative to 0)


def test_credit_module_imports_torch_only():
    code = ("import sys, creditlib.credit as c; c.get_credit('prefix-gae'); "
            "bad = [m for m in ('tensordict', 'torchrl', 'transformers', 'trl', 'verl') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ============================================================================ advantages
@pytest.mark.parametrize("name", ["grpo", "clamp", "grpo-lambda", "gspo", "entropy-80-20"])
def test_group_advantages_match_definition(name):
    g = torch.Generator().manual_seed(3)
    r = torch.randint(0, 3, (12,), generator=g).float()  # [B]
    r[8:] = 1.0  # a group with equal rewards: 0, never NaN
    m = get_credit(name)
    adv = m.advantages(r, group_size=4)  # [B]
    want = ref_group_adv(r, 4)
    if m.clamp_min is not None:
        want = want.clamp_min(m.clamp_min)
    assert adv.shape == (12,) and adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)
    assert (adv[8:] == 0).all()


def test_group_advantages_loo_none_and_group_ids():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(9, generator=g, dtype=torch.float64)  # [B]
    ids = torch.tensor([2, 0, 2, 1, 0, 2, 7, 0, 1])  # any order, sizes 3, 3, 2, 1
    m = CreditMethod("t", baseline="loo", scale="none", clamp_min=-0.5)
    want = ref_group_adv(r, group_ids=ids, baseline="loo", scale="none").clamp_min(-0.5)
    torch.testing.assert_close(m.advantages(r, group_ids=ids), want)
    with pytest.raises(ValueError, match="boundary"):
        m.advantages(r, group_ids=ids, boundary=torch.ones(9, 3, dtype=torch.bool))


PREFIX_CASES = [("prefix-gae", "std"), ("prefix-gae-clamp", "std"), ("prefix-gae-lambda", "std"),
                ("prefix-gae-lambda", "none")]


@pytest.mark.parametrize("name,scale", PREFIX_CASES, ids=[f"{n}-{s}" for n, s in PREFIX_CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_advantages_match_definition(name, scale, seed):
    tokens, mask, r, G = _prefix_batch(seed=seed)
    m = get_credit(name).replace(scale=scale)
    adv = m.advantages(r, mask, tokens=tokens, group_size=G)  # [B, T]
    want = ref_gae(ref_prefix_td(tokens, mask, r, G, scale=scale), mask, m.gae_gamma, m.gae_lam)
    if m.clamp_min is not None:
        want = want.clamp_min(m.clamp_min)
    assert adv.shape == mask.shape and adv.dtype == r.dtype
    torch.testing.assert_close(adv, want, rtol=1e-9, atol=1e-9)
    assert (adv[~mask] == 0).all() and (adv[5] == 0).all()  # masked and all-masked rows: 0


def test_prefix_gae_is_rloo_with_prefix_baseline():
    """gamma = lam = 1: the first valid token of a row carries the RLOO advantage; tokens that every
    member of the group shares carry 0 (the pushes of the group on them cancel)."""
    tokens, mask, r, G = _prefix_batch(seed=2)
    adv = get_credit("prefix-gae").advantages(r, mask, tokens=tokens, group_size=G)  # [B, T]
    rloo = ref_group_adv(r, G, baseline="loo")  # [B]
    for i in range(mask.shape[0]):
        cols = mask[i].nonzero().flatten()
        if cols.numel():
            torch.testing.assert_close(adv[i, cols[0]], rloo[i], rtol=1e-9, atol=1e-9)
    # a group whose members all start with the same two tokens: on those tokens the pushes of the
    # group cancel exactly; after the split, credit moves to the tokens where completions part ways
    tok = torch.tensor([[5, 6, 1, 1], [5, 6, 2, 2], [5, 6, 2, 3]])  # [3, 4]
    msk = torch.ones(3, 4, dtype=torch.bool)
    rr = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    a = get_credit("prefix-gae").advantages(rr, msk, tokens=tok, group_size=3)  # [3, 4]
    torch.testing.assert_close(a[:, :3].sum(0), torch.zeros(3, dtype=a.dtype), atol=1e-12, rtol=0)
    s = _std([1.0, 0.0, 1.0]) + 1e-4
    # row 0 leaves both others at token 2; its baseline stays that of the last shared prefix (0.5)
    torch.testing.assert_close(a[0], torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=a.dtype) / s)
    # rows 1 and 2 share token 2 and part ways at token 3: there each is compared with the other only
    torch.testing.assert_close(a[1], torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=a.dtype) / s)
    torch.testing.assert_close(a[2], torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=a.dtype) / s)


def test_prefix_group_ids_boundary_and_long_rows():
    tokens, mask, r, G = _prefix_batch(seed=5)
    perm = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(0))
    ids = (torch.arange(tokens.shape[0]) // G)[perm]
    m = get_credit("prefix-gae-lambda")
    adv = m.advantages(r[perm], mask[perm], tokens=tokens[perm], group_ids=ids)
    want = m.advantages(r, mask, tokens=tokens, group_size=G)[perm]
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    # the step-level variant is passed through to F.prefix_td unchanged
    boundary = (tokens == 0) & mask  # [B, T]
    got = m.advantages(r, mask, tokens=tokens, group_size=G, boundary=boundary)
    exp = F.traced_credit(F.prefix_td(tokens, mask, r, G, boundary=boundary), mask, m.gae_style)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)
    # a long row: T = 600, two groups of 3, binary vocab (long shared prefixes)
    g = torch.Generator().manual_seed(9)
    T = 600
    tok = torch.randint(0, 2, (6, T), generator=g)
    tok[:, :300] = tok[0, :300]
    msk = torch.ones(6, T, dtype=torch.bool)
    msk[1, :50] = False
    msk[4, 500:] = False
    rr = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    got = m.advantages(rr, msk, tokens=tok, group_size=3)
    torch.testing.assert_close(got, ref_gae(ref_prefix_td(tok, msk, rr, 3), msk, 1.0, 0.95), rtol=1e-9, atol=1e-9)


def test_prefix_advantages_errors():
    tokens, mask, r, G = _prefix_batch()
    m = get_credit("prefix-gae")
    with pytest.raises(ValueError, match="tokens"):
        m.advantages(r, mask, group_size=G)
    with pytest.raises(ValueError, match="mask"):
        m.advantages(r, None, tokens=tokens, group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        m.advantages(r, mask, tokens=tokens, group_size=5)


# ============================================================================ loss mask
def test_loss_mask():
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(6, 50, generator=g) > 0.3  # [B, T]
    mask[2] = False
    ent = torch.rand(6, 50, generator=g) * 3  # [B, T]
    ent = torch.where(mask, ent, torch.full_like(ent, float("nan")))  # ignored where masked
    sel = get_credit("entropy-80-20").loss_mask(mask, ent)
    assert sel.dtype == torch.bool and torch.equal(sel, ref_entropy_mask(ent, mask, 0.2))
    frac = sel.sum().item() / mask.sum().item()
    assert 0.15 < frac <= 0.25
    for n in ("grpo", "prefix-gae", "gspo"):
        assert get_credit(n).loss_mask(mask) is mask and get_credit(n).loss_mask(mask, ent) is mask
    with pytest.raises(ValueError, match="needs entropy"):
        get_credit("entropy-80-20").loss_mask(mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        get_credit("grpo").loss_mask(mask.float())


def test_treerl_registered_method_equals_its_function():
    """The registered `treerl` method is the plain TreeRL rule (F.treerl_advantage), clamp-free."""
    from creditlib.functional import treerl_advantage
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 3, (8, 7), generator=g)            # [B, T]
    mask = torch.arange(7) < torch.randint(2, 8, (8, 1), generator=g)  # [B, T]
    rewards = torch.randint(0, 2, (8,), generator=g).double()      # [B]
    m = get_credit("treerl")
    adv = m.advantages(rewards, mask, tokens=tokens, group_size=4)  # [B, T]
    ref = treerl_advantage(tokens, mask, rewards, 4)
    assert torch.equal(adv, ref) and adv.abs().sum() > 0
