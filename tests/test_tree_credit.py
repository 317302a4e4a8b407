"""The TreeRL global-plus-local credit rule (issue 19, item 5): vectorised against the plain loop on
random trees, awkward masks, groups of one; hand-computed values; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from creditlib.ops.treerl.naive import treerl_advantage_reference
from creditlib.functional import treerl_advantage


def _tree_tokens(K, G, T, gen, vocab=3):
    """``K`` groups of ``G`` rows that share prefixes: each row copies a random earlier member up to a
    random cut (a prefix tree), small vocabulary so that chance agreements happen too."""
    tok = torch.randint(0, vocab, (K * G, T), generator=gen)  # [B, T]
    for k in range(K):
        for i in range(1, G):
            j = k * G + int(torch.randint(0, i, (1,), generator=gen))
            cut = int(torch.randint(0, T + 1, (1,), generator=gen))
            tok[k * G + i, :cut] = tok[j, :cut]
    return tok


def _masks(B, T, gen):
    lens = torch.randint(0, T + 1, (B, 1), generator=gen)  # [B, 1] zero-length rows included
    ar = torch.arange(T)[None, :]  # [1, T]
    return {"right": ar < lens, "left": ar >= T - lens,  # [B, T] each
            "runs": (ar < lens) & ((ar % 5) != 2),
            "scattered": torch.rand(B, T, generator=gen) < 0.7,
            "all-masked-rows": (ar < lens) & (torch.arange(B)[:, None] % 3 != 0)}


@pytest.mark.parametrize("mask_kind", ["right", "left", "runs", "scattered", "all-masked-rows"])
@pytest.mark.parametrize("scale", ["none", "std"])
def test_matches_plain_loop_group_size(mask_kind, scale):
    gen = torch.Generator().manual_seed(["right", "left", "runs", "scattered", "all-masked-rows"].index(mask_kind))
    for K, G, T in ((3, 4, 9), (2, 8, 17), (1, 2, 5)):
        tok = _tree_tokens(K, G, T, gen)
        mask = _masks(K * G, T, gen)[mask_kind]
        r = torch.randint(0, 2, (K * G,), generator=gen).double() + 0.1 * torch.rand(K * G, generator=gen).double()
        got = treerl_advantage(tok, mask, r, G, scale=scale)
        want = treerl_advantage_reference(tok, mask, r, G, scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert float(got[~mask].abs().sum()) == 0


def test_matches_plain_loop_group_ids_unequal_groups_and_groups_of_one():
    gen = torch.Generator().manual_seed(5)
    B, T = 14, 11
    tok = _tree_tokens(1, B, T, gen)  # one tree, then cut into unequal groups, shuffled ids
    ids = torch.tensor([3, 3, 7, 3, 1, 7, 7, 9, 3, 1, 7, 7, 3, 1])  # 9 is a group of one
    for kind, mask in _masks(B, T, gen).items():
        r = torch.rand(B, generator=gen, dtype=torch.float64)
        got = treerl_advantage(tok, mask, r, group_ids=ids)
        want = treerl_advantage_reference(tok, mask, r, group_ids=ids)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=kind)
        assert float(got[7].abs().sum()) == 0  # the group of one


def test_hand_computed_tree():
    # group of 3: rows 0 and 1 share "5 6", then part; row 2 parts at token 0
    tok = torch.tensor([[5, 6, 1, 2], [5, 6, 3, 0], [4, 4, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    R = torch.tensor([1.0, 0.0, 0.0])
    got = treerl_advantage(tok, mask, R, 3)
    root = 1 / 3
    want = torch.zeros(3, 4)
    # row 0: k=0,1 node {0,1} (mean 1/2), parent at k=0 root, at k=1 {0,1}; k>=2 node {0}
    want[0, 0] = ((0.5 - root) + (0.5 - root)) / math.sqrt(2)
    want[0, 1] = ((0.5 - root) + 0) / math.sqrt(2)
    want[0, 2] = ((1 - root) + (1 - 0.5)) / 1
    want[0, 3] = ((1 - root) + 0) / 1
    want[1, 0], want[1, 1] = ((0.5 - root) * 2) / math.sqrt(2), (0.5 - root) / math.sqrt(2)
    want[1, 2] = ((0 - root) + (0 - 0.5)) / 1
    want[2, 0] = ((0 - root) + (0 - root)) / 1
    want[2, 1] = (0 - root) / 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_flat_group_without_shared_tokens():
    # every row parts at token 0: token 0 gets 2 (R_i - mean), later tokens R_i - mean
    tok = torch.tensor([[0, 1, 1], [1, 1, 1], [2, 1, 1], [3, 0, 0]])
    mask = torch.ones(4, 3, dtype=torch.bool)
    R = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    got = treerl_advantage(tok, mask, R, 4)
    a = R - R.mean()
    torch.testing.assert_close(got[:, 0], 2 * a)
    torch.testing.assert_close(got[:, 1:], a[:, None].expand(4, 2))


def test_groups_of_one_dtype_and_empty():
    tok = torch.randint(0, 5, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    r = torch.rand(3, dtype=torch.float32)
    out = treerl_advantage(tok, mask, r, 1)
    assert out.dtype == torch.float32 and float(out.abs().sum()) == 0
    assert treerl_advantage(tok[:0], mask[:0], r[:0], 2).shape == (0, 4)
    assert treerl_advantage(tok, mask, r.half(), group_ids=torch.tensor([0, 0, 1])).dtype == torch.float16


def test_bad_input():
    tok = torch.randint(0, 5, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    r = torch.rand(4)
    with pytest.raises(ValueError, match="group_size"):
        treerl_advantage(tok, mask, r, 3)
    with pytest.raises(ValueError, match="scale"):
        treerl_advantage(tok, mask, r, 2, scale="max")
    with pytest.raises(ValueError, match="rewards"):
        treerl_advantage(tok, mask, r[:3], 2)
    with pytest.raises(ValueError, match="tokens"):
        treerl_advantage(tok.float(), mask, r, 2)
    with pytest.raises(ValueError, match="group_size or group_ids"):
        treerl_advantage(tok, mask, r)
    with pytest.raises(ValueError, match="mask"):
        treerl_advantage(tok, mask.float(), r, 2)
