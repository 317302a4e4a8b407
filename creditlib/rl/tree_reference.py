"""The plain definition of the tree sampler: one prefix at a time, Python loops, no batching.

:func:`sample_tree_reference` builds the same trees as :func:`creditlib.rl.tree.sample_tree` (the
tests hold the batched sampler against it with a seeded toy policy): the same node seeds
(:func:`creditlib.rl.tree.node_seed`), the same slot order, and the fork rule written as a sort and
a greedy scan over a Python list instead of masked ``argmax`` over a batch. Each node is sampled
with its own backend call of one request. Not for training (one backend call per node).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .tree import TreeBackend, TreeRollout, TreeSpec, _assemble, _check_sampler_args, _Leaf, _prompts, node_seed

__all__ = ["sample_tree_reference", "select_forks_reference"]


def select_forks_reference(entropies: List[float], start: int, length: int, spec: TreeSpec,
                           keys: Optional[List[float]] = None):
    """Fork positions of one leaf: ``(positions, stages)``, two lists of ``spec.forks`` ints.

    Allowed: ``start + min_gap <= k <= length - 2`` (``"segment"``: also ``(k - start) % S == 0``).
    Candidates sorted by key, highest first (ties: the earlier position); stage 0 takes them greedily
    at least ``min_gap`` from earlier picks, stage 1 any allowed one not yet picked, stage 2 the leaf's
    own fork point ``start``."""
    allowed = [k for k in range(start + spec.min_gap, length - 1)]
    if spec.select == "segment":
        allowed = [k for k in allowed if (k - start) % spec.segment_len == 0]
    if spec.select == "entropy":
        key = {k: float(entropies[k]) for k in allowed}
    elif spec.select == "uniform":
        key = {k: float(keys[k]) for k in allowed}
    else:
        key = {k: -float(k) for k in allowed}
    order = sorted(allowed, key=lambda k: (-key[k], k))
    picks, stages = [], []
    for _ in range(spec.forks):
        found = None
        for k in order:
            if k not in picks and all(abs(k - p) >= spec.min_gap for p, s in zip(picks, stages) if s < 2):
                found, st = k, 0
                break
        if found is None:
            rest = [k for k in order if k not in picks]
            found, st = (rest[0], 1) if rest else (start, 2)
        picks.append(found)
        stages.append(st)
    return picks, stages


def sample_tree_reference(backend: TreeBackend, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          spec: TreeSpec, *, max_new_tokens: int, seed: Optional[int] = None,
                          group_size: Optional[int] = None, tokenizer=None,
                          pad_id: Optional[int] = None) -> TreeRollout:
    """The tree sampler's definition: prompt by prompt, node by node, one request per backend call.

    Same arguments and result as :func:`creditlib.rl.tree.sample_tree`."""
    seed = _check_sampler_args(spec, max_new_tokens, group_size, seed)
    prompts = _prompts(prompt_ids, prompt_mask)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = int(backend.eos_ids[0]) if pad_id is None else int(pad_id)
    fallback = {"forks": 0, "relaxed_gap": 0, "at_own_fork": 0}
    leaves: List[_Leaf] = []
    for k, prompt in enumerate(prompts):
        slot = 0
        frontier = []
        for m in range(spec.roots):
            c = backend.sample([prompt], [max_new_tokens], [node_seed(seed, k, slot)])[0]
            frontier.append(_Leaf(k, slot, -1, 0, 0, list(c.tokens), c.logprobs.float(), c.entropies.float()))
            slot += 1
        leaves.extend(frontier)
        for d in range(1, spec.depth + 1):
            made = []
            for x in frontier:
                n = len(x.tokens)
                keys = None
                if spec.select == "uniform":
                    g = torch.Generator().manual_seed(node_seed(seed, k, x.slot, salt=1))
                    keys = torch.rand(n, generator=g).tolist()
                picks, stages = select_forks_reference(x.entropies.tolist(), x.fork, n, spec, keys)
                fallback["forks"] += len(picks)
                fallback["relaxed_gap"] += stages.count(1)
                fallback["at_own_fork"] += stages.count(2)
                for kf in picks:
                    for _ in range(spec.branches):
                        c = backend.sample([prompt + x.tokens[:kf]], [max_new_tokens - kf],
                                           [node_seed(seed, k, slot)])[0]
                        made.append(_Leaf(k, slot, x.slot, kf, d, x.tokens[:kf] + list(c.tokens),
                                          torch.cat([x.logprobs[:kf], c.logprobs.float()]),
                                          torch.cat([x.entropies[:kf], c.entropies.float()])))
                        slot += 1
            leaves.extend(made)
            frontier = made
    return _assemble(leaves, prompts, spec, pad_id, fallback, tokenizer)
