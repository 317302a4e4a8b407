"""Tree rollouts: branch where the policy is unsure, so the group's prefix tree is informative.

``TreeSpec(roots=M, forks=N, branches=Bf, depth=D, select="entropy")`` (docs/design.md, "Tree
rollouts"): sample ``M`` completions of a prompt; then, ``D`` times, every leaf made in the previous
round picks ``N`` fork positions ``k`` among its own new tokens and samples ``Bf`` continuations of
``prompt + o[:k]`` (the token at ``k`` is re-sampled). Leaves per prompt:
``M * sum_{d=0..D} (N * Bf)^d`` (:attr:`TreeSpec.leaves`). Each leaf is one ordinary row: the whole
completion, shared prefix tokens included, with the old log-probs of those tokens copied from the
row it forked from.

Pieces:

* :class:`TreeSpec`: the shape, validated (a ``ValueError`` naming the argument).
* :class:`TreeBackend`: the generation-backend protocol. ``sample(requests, max_new_tokens, seeds)``
  continues every request (prompt + prefix token ids) until an EOS (kept) or its own cap, and returns
  the tokens, their log-probs under the sampling distribution (temperature applied, as the recipe's
  old log-probs) and the per-token entropies of that distribution. Request ``i``'s result depends on
  ``(requests[i], max_new_tokens[i], seeds[i])`` only, never on the rest of the batch: that is what
  makes the batched sampler equal to the one-prefix-at-a-time definition
  (:mod:`creditlib.rl.tree_reference`).
* :class:`TransformersBackend` (``model.generate``, every request of a round in one left-padded
  call) and :class:`CallableBackend` (any ``next_logits(sequences) -> [R, V]`` function, e.g. a fixed
  Markov table: a policy whose next-token distribution is known).
* :func:`sample_tree`: the batched sampler (one backend call per round, for every prompt and every
  fork of the round) -> :class:`TreeRollout`.

Randomness: every node (leaf) of the tree has its own seed, :func:`node_seed` ``(seed, prompt,
slot)``, where ``slot`` is the leaf's row inside its prompt's group. The backend draws the node's
tokens from a generator seeded with it (Gumbel-max: the token is ``argmax(log p + G)`` with
standard Gumbel noise ``G``, an exact sample of ``p``), and ``select="uniform"`` draws the leaf's
fork positions from a second generator seeded with ``node_seed(seed, prompt, slot, salt=1)``.

Fork positions (0-based positions of the completion). A leaf's own tokens start at ``s`` (its fork
point; 0 for a root). Allowed positions: ``s + min_gap <= k <= n - 2`` (after its fork point and at
least ``min_gap`` past it, not its last token); ``"segment"`` keeps only ``k = s + j * S``
(``j >= 1``). Picks are greedy in key order (``"entropy"``: highest sampling entropy first,
``"uniform"``: a random key per position, ``"segment"``: earliest first; ties: the earlier
position), each at least ``min_gap`` from the picks before it.

Too-short leaves. When a leaf has fewer than ``N`` such positions, the sampler still returns the
requested leaves, never changing the group size: the missing forks take (1) allowed positions not
yet picked, ignoring ``min_gap`` between picks (counted as ``relaxed_gap``), then (2) the leaf's own
fork point ``s`` (counted as ``at_own_fork``): its ``Bf`` continuations re-sample from the prefix
the leaf itself was sampled from (for a root, the prompt: fresh independent completions). Both
keep every row a fair sample (a continuation is always sampled from the policy given its prefix).
The counts are in :attr:`TreeRollout.fallback` and are logged (``logging`` logger
``creditlib.rl.tree``, INFO).

KV-cache reuse across rounds: not done. The fork prefixes of a round have different lengths per
row, and the transformers cache is one rectangular tensor per layer aligned on the batch's left
padding, with only batch-wide ``crop``; reusing each parent's cache would mean re-aligning every
row's keys and values to a new padding, which ``generate`` does not offer.
``benchmarks/test_bench_tree.py`` measures the prefill share of a round (the most that reuse could
save).

Pipelined trees (``sample_tree(..., pipeline=True)``, any ``select``): the whole tree in one decode
loop, every branch decoding beside its parent. The final fork positions of a leaf of length ``n``
are :func:`select_forks` over its allowed positions ``s + min_gap <= k <= n - 2``. While the leaf
decodes, position ``k`` is confirmed allowed once it has drawn token ``k`` and that token is
neither an EOS nor at the cap (so it will draw ``k + 1``); after every step the sampler runs
:func:`select_forks` on the confirmed part of each live leaf (all leaves at once), and the
selection at the leaf's last step is its final one. Each pick ``j`` of the current selection
(stage 0 or 1; the own-fork-point fallback only once the leaf has ended) has ``Bf`` branch rows
keyed by ``(k, j)``: their slots are the two-round sampler's (``_child_slot``: leaf, rank ``j``,
branch), so their seeds and tokens are final the moment they start. When the selection moves (a
later token of higher entropy, a higher ``"uniform"`` key, a pick that changes rank), the rows
whose ``(k, j)`` is no longer selected are dropped with their subtrees (wasted work, no sequential
cost) and the new picks get new rows. A branch's token ``k`` is drawn from the leaf's stored
log-probs of step ``k``; its cache row is a copy of the leaf's, which holds ``prompt + o[:j]``
(``j >= k``), with the columns of ``o[k:j]`` masked out (a hole): the next position is the count
of real tokens, so it continues exactly as a prefill of ``prompt + o[:k]`` would. ``"uniform"``
keys are drawn ``torch.rand(T)`` once per leaf (``rand(T)[:n] == rand(n)`` for torch's CPU
generator, the two-round sampler's ``rand(n)``). With ``forks=1`` the pick is the running
arg-max, so its branches start at the very step that draws it; with ``forks > 1`` a pick that
changes rank is re-spawned later (with a hole). Children fork the same way (any depth). The
tree is the two-round sampler's (tokens, slots, parents, fork positions, fallback counts) up to
floating point (in float64 the tokens are equal), in about ``T`` sequential decode steps when no
leaf needs the own-fork-point fallback (whose branches start when the leaf ends). The price: a
live forking leaf keeps its ``[V]`` log-probs of the steps it may still fork at (with
``min_gap == 1`` or segment forks only its current picks' and its own fork point's; with a larger
``min_gap`` every step's) and the dropped rows' decode work (:attr:`TreeRollout.pipeline_stats`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["TreeSpec", "SELECTS", "Continuation", "TreeBackend", "CallableBackend", "TransformersBackend",
           "VLLMBackend", "topk_entropy", "TreeRollout", "sample_tree", "node_seed", "select_forks"]

logger = logging.getLogger("creditlib.rl.tree")

#: the fork-selection rules of :class:`TreeSpec`.
SELECTS = ("entropy", "uniform", "segment")
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- the shape
def _count(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the tree sampled for every prompt.

    Args:
        roots: ``M`` independent completions of the prompt (``>= 1``).
        forks: ``N`` fork positions picked on every leaf of a round (``>= 1``).
        branches: ``Bf`` continuations sampled at each fork position (``>= 1``).
        depth: ``D`` rounds of forking (``>= 0``; 0 is a flat group of ``M``).
        select: ``"entropy"``, ``"uniform"`` or ``"segment"``.
        min_gap: fork positions of one leaf are at least this far apart and from the leaf's own
            fork point (``>= 1``).
        segment_len: ``S`` for ``select="segment"`` (fork at every ``S``-th token; ``>= min_gap``).

    ``TreeSpec()`` is the default tree: 2 roots, each forked once into 3 branches, 8 leaves.
    """

    roots: int = 2
    forks: int = 1
    branches: int = 3
    depth: int = 1
    select: str = "entropy"
    min_gap: int = 1
    segment_len: int = 4

    def __post_init__(self) -> None:
        for name, minimum in (("roots", 1), ("forks", 1), ("branches", 1), ("depth", 0), ("min_gap", 1),
                              ("segment_len", 1)):
            object.__setattr__(self, name, _count(name, getattr(self, name), minimum))
        if not isinstance(self.select, str) or self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.select == "segment" and self.segment_len < self.min_gap:
            raise ValueError(f"segment_len ({self.segment_len}) must be >= min_gap ({self.min_gap}) for "
                             "select='segment' (forks every segment_len tokens)")

    @property
    def leaves(self) -> int:
        """Rows per prompt: ``roots * sum_{d=0..depth} (forks * branches)^d``."""
        f = self.forks * self.branches
        return self.roots * sum(f ** d for d in range(self.depth + 1))

    def check_group_size(self, group_size, name: str = "group_size") -> int:
        """``group_size`` itself when it equals :attr:`leaves`, else a ``ValueError`` naming ``name``
        (the trainer's option, e.g. ``"num_generations"``) and shapes that would give it. Nothing
        ever changes the group size silently."""
        G = _count(name, group_size, 1)
        if G != self.leaves:
            alt = [s for s in _shapes(G)][:4]
            hint = ("; shapes with %d leaves: %s" % (G, ", ".join(alt))) if alt else ""
            raise ValueError(f"{name}={G} but {self} gives {self.leaves} leaves per prompt "
                             f"(roots * sum_d (forks * branches)^d){hint}")
        return G


def _shapes(G: int) -> List[str]:
    """A few ``(roots, forks, branches, depth)`` shapes with ``G`` leaves (for error messages)."""
    out = [f"TreeSpec(roots={G}, depth=0)"]
    for depth in (1, 2):
        for roots in range(1, G + 1):
            for f in range(2, G + 1):
                if roots * sum(f ** d for d in range(depth + 1)) == G:
                    out.append(f"TreeSpec(roots={roots}, forks=1, branches={f}, depth={depth})")
    return out[1:] + out[:1]


def node_seed(seed: int, prompt: int, slot: int, salt: int = 0) -> int:
    """The seed of one node of the tree: splitmix64 of ``(seed, prompt, slot, salt)``, 63 bits.

    ``slot`` is the node's row inside its prompt's group (roots first, then each round's children
    in parent, fork, branch order); ``salt`` 0 seeds its tokens, 1 its ``"uniform"`` fork keys."""
    x = (int(seed) & _MASK64)
    for v in (prompt, slot, salt):
        x = (x ^ (int(v) & _MASK64)) * 0x9E3779B97F4A7C15 & _MASK64
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & _MASK64
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- backends
class Continuation(NamedTuple):
    """One sampled continuation: ``n`` new tokens (the last is EOS unless the cap was reached)."""

    tokens: List[int]         # [n] token ids
    logprobs: torch.Tensor    # [n] float32 log-probs under the sampling distribution (tempered)
    entropies: torch.Tensor   # [n] float32 entropies of the sampling distribution


@runtime_checkable
class TreeBackend(Protocol):
    """Samples continuations of token sequences.

    ``sample(requests, max_new_tokens, seeds)``: ``requests[i]`` is a list of token ids (the prompt's
    real tokens, then a completion prefix); sample at most ``max_new_tokens[i]`` new tokens, stopping
    after the first token in ``eos_ids`` (kept). Result ``i`` must depend only on ``requests[i]``,
    ``max_new_tokens[i]`` and ``seeds[i]`` (up to floating point), not on the other requests.
    """

    eos_ids: Sequence[int]

    def sample(self, requests: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
               seeds: Sequence[int]) -> List[Continuation]: ...


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite float > 0 (tree sampling is never greedy), "
                         f"got {temperature!r}")
    return float(temperature)


def _check_requests(requests, max_new_tokens, seeds) -> None:
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError("requests must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, (list, tuple)) or len(max_new_tokens) != len(requests):
        raise ValueError(f"max_new_tokens must be a list of {len(requests)} ints (one per request)")
    if not isinstance(seeds, (list, tuple)) or len(seeds) != len(requests):
        raise ValueError(f"seeds must be a list of {len(requests)} ints (one per request)")
    for i, (r, m) in enumerate(zip(requests, max_new_tokens)):
        if len(r) == 0:
            raise ValueError(f"requests[{i}] is empty: every request needs at least one token")
        _count(f"max_new_tokens[{i}]", m, 1)


def _draw(logp: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row by Gumbel-max with each row's own generator: ``argmax(logp + G)``.

    ``logp``: float32 ``[R, V]`` log-probs. Returns int64 ``[R]``. The noise of row ``r`` is the next
    ``V`` uniforms of ``gens[r]`` (float64), so a row's draw never depends on the other rows."""
    R, V = logp.shape
    u = torch.empty(R, V, dtype=torch.float64)  # [R, V]
    for r, g in enumerate(gens):
        torch.rand(V, generator=g, dtype=torch.float64, out=u[r])
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # [R, V]
    return (logp.detach().cpu().to(torch.float64) + gumbel).argmax(-1)  # [R]


def _tempered(logits: torch.Tensor, temperature: float):
    """float32 log-probs and entropies ``[R, V]`` / ``[R]`` of ``softmax(logits / temperature)``."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        from .model import NonFiniteError

        raise NonFiniteError("the policy produced NaN/inf logits during the tree rollout (diverged weights)")
    lp = torch.log_softmax(logits.float() / temperature, -1)  # [R, V]
    p = lp.exp()  # [R, V]
    ent = -(torch.where(p > 0, p * lp, torch.zeros_like(lp))).sum(-1)  # [R]
    return lp, ent


def _generators(seeds: Sequence[int]) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class CallableBackend:
    """A policy given as a function of the token sequences: ``next_logits(seqs) -> [R, V]`` logits of
    the next token for each of the ``R`` sequences (lists of ids). Decodes step by step, all live
    requests in one call per step. A fixed table (``lambda seqs: table[[s[-1] for s in seqs]]``) is a
    Markov-chain policy whose next-token distribution is known exactly.

    Args:
        next_logits: the policy.
        eos_ids: end-of-sequence ids.
        temperature: logits are divided by it (``> 0``).
    """

    def __init__(self, next_logits: Callable[[List[List[int]]], torch.Tensor], eos_ids: Sequence[int],
                 temperature: float = 1.0):
        if not callable(next_logits):
            raise ValueError(f"next_logits must be callable, got {type(next_logits).__name__}")
        self.next_logits = next_logits
        self.eos_ids = sorted({int(e) for e in eos_ids})
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one end-of-sequence id")
        self.temperature = _check_temperature(temperature)

    def step_decoder(self) -> "_SeqStepDecoder":
        """A step-wise decoder over the sequences (what ``sample_tree(..., pipeline=True)`` runs on)."""
        return _SeqStepDecoder(self)

    def sample(self, requests, max_new_tokens, seeds) -> List[Continuation]:
        _check_requests(requests, max_new_tokens, seeds)
        R = len(requests)
        gens = _generators(seeds)
        seqs = [list(map(int, r)) for r in requests]
        new: List[List[int]] = [[] for _ in range(R)]
        lps: List[List[torch.Tensor]] = [[] for _ in range(R)]
        ents: List[List[torch.Tensor]] = [[] for _ in range(R)]
        live = list(range(R))
        eos = set(self.eos_ids)
        while live:
            logits = self.next_logits([seqs[i] for i in live])  # [L, V]
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(live):
                raise ValueError(f"next_logits must return a [R, V] tensor for R = {len(live)} sequences, got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)}")
            lp, ent = _tempered(logits, self.temperature)  # [L, V], [L]
            tok = _draw(lp, [gens[i] for i in live])  # [L]
            still = []
            for r, i in enumerate(live):
                t = int(tok[r])
                seqs[i].append(t)
                new[i].append(t)
                lps[i].append(lp[r, t])
                ents[i].append(ent[r])
                if t not in eos and len(new[i]) < max_new_tokens[i]:
                    still.append(i)
            live = still
        return [Continuation(new[i], torch.stack(lps[i]).float(), torch.stack(ents[i]).float()) for i in range(R)]


class _GumbelProcessor:
    """A ``transformers`` logits processor that samples each row with its own generator (Gumbel-max)
    and records the tempered log-prob of the drawn token and the entropy; it returns scores whose
    argmax is the drawn token, so ``generate`` runs in greedy mode."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.gens = _generators(seeds)
        self.temperature = temperature
        self.logps: List[torch.Tensor] = []   # per step: [R]
        self.ents: List[torch.Tensor] = []    # per step: [R]

    def __call__(self, input_ids, scores):
        lp, ent = _tempered(scores, self.temperature)  # [R, V], [R]
        tok = _draw(lp, self.gens).to(scores.device)  # [R]
        self.logps.append(lp.gather(1, tok[:, None]).squeeze(1).cpu())
        self.ents.append(ent.cpu())
        out = torch.full_like(scores, float("-inf"))  # [R, V]
        out.scatter_(1, tok[:, None], 0.0)
        return out


class _RowCap:
    """Stopping criterion: row ``i`` stops once it has ``caps[i]`` new tokens (one generate call serves
    requests with different caps)."""

    def __init__(self, caps: torch.Tensor, start: int):
        self.caps, self.start = caps, start  # [R]

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.caps.to(input_ids.device)  # [R] bool


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or the
    older ``past_key_values``."""
    import inspect

    fwd = type(getattr(model, "module", model)).forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


class TransformersBackend:
    """A ``transformers`` causal LM over all requests of a round at once (left padding).

    Every row is drawn with its own generator (Gumbel-max), so a row's tokens do not depend on the
    batch; the log-probs and entropies are those of ``softmax(logits / temperature)`` at each step
    (``top_k``/``top_p`` off: the recipe's old log-probs are of the same distribution). Rows stop at
    an EOS or at their own cap.

    Two decoders, the same distribution and seeds:

    * ``decode="loop"`` (default): creditlib's own decode loop over the model's forward with a
      ``DynamicCache``. Identical requests (the ``Bf`` branches of one fork share their prefix) are
      prefilled once and their cache rows copied; rows leave the batch as soon as they end
      (EOS or cap), so later steps run over the live rows only; no logits-processor or
      stopping-criteria machinery per step.
    * ``decode="generate"``: ``model.generate`` in greedy mode on scores whose argmax is the drawn
      token (a logits processor) with a per-row cap (a stopping criterion); every row stays in the
      batch until the longest ends. Needed for ``synced=True`` (FSDP: ``synced_gpus``).

    Args:
        model: a ``transformers`` causal LM (put in eval mode for the call, then restored).
        tokenizer: its tokenizer (pad id, EOS ids); or give ``pad_id`` and ``eos_ids``.
        temperature: ``> 0``.
        decode: ``"loop"`` or ``"generate"`` (default: ``"generate"`` when ``synced``, else ``"loop"``).
        synced: ``synced_gpus=True`` (FSDP; ``decode="generate"`` only).
    """

    DECODERS = ("loop", "generate")

    def __init__(self, model, tokenizer=None, *, temperature: float = 1.0, eos_ids: Optional[Sequence[int]] = None,
                 pad_id: Optional[int] = None, synced: bool = False, decode: Optional[str] = None):
        from ..generation import eos_token_ids

        self.model = model
        self.temperature = _check_temperature(temperature)
        if eos_ids is None:
            if tokenizer is None:
                raise ValueError("give tokenizer or eos_ids")
            eos_ids = eos_token_ids(tokenizer, getattr(model, "module", model))
        self.eos_ids = sorted({int(e) for e in eos_ids})
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one end-of-sequence id")
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = self.eos_ids[0]
        self.pad_id = int(pad_id)
        self.synced = bool(synced)
        if decode is None:
            decode = "generate" if self.synced else "loop"
        if decode not in self.DECODERS:
            raise ValueError(f"decode must be one of {self.DECODERS}, got {decode!r}")
        if decode == "loop" and self.synced:
            raise ValueError("decode='loop' does not support synced=True (FSDP): use decode='generate'")
        self.decode = decode

    def step_decoder(self) -> "_KVStepDecoder":
        """The step-wise decoder of ``decode="loop"`` (the model's forward over a ``DynamicCache``,
        cache rows selected and copied between steps): what ``sample_tree(..., pipeline=True)`` runs on."""
        if self.decode != "loop":
            raise ValueError(f"pipeline=True needs TransformersBackend(decode='loop') (its own decode loop over "
                             f"the KV cache), got decode={self.decode!r}")
        return _KVStepDecoder(self)

    def sample(self, requests, max_new_tokens, seeds) -> List[Continuation]:
        _check_requests(requests, max_new_tokens, seeds)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if self.decode == "loop":
                    return self._sample_loop(requests, max_new_tokens, seeds)
                return self._sample_generate(requests, max_new_tokens, seeds)
        finally:
            self.model.train(was_training)

    def _sample_loop(self, requests, max_new_tokens, seeds) -> List[Continuation]:
        from transformers import DynamicCache

        from ..generation import left_pad

        dev = next(self.model.parameters()).device
        R = len(requests)
        reqs = [tuple(int(t) for t in r) for r in requests]
        first: Dict[tuple, int] = {}
        inv_l = [first.setdefault(r, len(first)) for r in reqs]  # request -> its unique prefix
        uniq = list(first)
        ids, amask = left_pad(uniq, self.pad_id, dev)  # [U, L]
        pos = (amask.cumsum(-1) - 1).clamp_min(0)  # [U, L]
        cache = DynamicCache()  # filled in place by every forward
        ck = _cache_kwarg(self.model)
        out = self.model(input_ids=ids, attention_mask=amask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{ck: cache})
        inv = torch.tensor(inv_l, dtype=torch.long, device=dev)  # [R]
        logits = out.logits[:, -1].index_select(0, inv)  # [R, V]
        if len(uniq) < R:  # the branches of one fork: one prefill, copied cache rows
            cache.batch_select_indices(inv)
        amask = amask.index_select(0, inv)  # [R, L]
        caps = torch.tensor([int(m) for m in max_new_tokens], dtype=torch.long)  # [R]
        Tm = int(caps.max())
        toks = torch.zeros(R, Tm, dtype=torch.long)  # [R, Tm] drawn tokens
        lps = torch.zeros(R, Tm, dtype=torch.float32)  # [R, Tm]
        ents = torch.zeros(R, Tm, dtype=torch.float32)  # [R, Tm]
        n = torch.zeros(R, dtype=torch.long)  # [R] tokens per row
        gens = _generators(seeds)
        eos = torch.tensor(self.eos_ids, dtype=torch.long)  # [E]
        live = torch.arange(R)  # [n_live] rows still decoding (cpu)
        for step in range(Tm):
            lp, ent = _tempered(logits, self.temperature)  # [n_live, V], [n_live]
            tok = _draw(lp, [gens[i] for i in live.tolist()])  # [n_live] cpu
            toks[live, step] = tok
            lps[live, step] = lp.gather(1, tok.to(lp.device)[:, None]).squeeze(1).float().cpu()
            ents[live, step] = ent.float().cpu()
            n[live] = step + 1
            keep = ~(torch.isin(tok, eos) | (caps[live] <= step + 1))  # [n_live]
            if not bool(keep.any()):
                break
            if not bool(keep.all()):  # finished rows leave the batch
                k_idx = keep.nonzero().squeeze(1)  # [n_keep]
                live, tok = live[k_idx], tok[k_idx]
                k_dev = k_idx.to(dev)
                cache.batch_select_indices(k_dev)
                amask = amask.index_select(0, k_dev)
            amask = torch.cat([amask, amask.new_ones(amask.shape[0], 1)], 1)  # [n_live, L + step + 1]
            out = self.model(input_ids=tok.to(dev)[:, None], attention_mask=amask,
                             position_ids=amask.sum(-1, keepdim=True) - 1, use_cache=True, **{ck: cache})
            logits = out.logits[:, -1]  # [n_live, V]
        return [Continuation(toks[i, :int(n[i])].tolist(), lps[i, :int(n[i])].clone(), ents[i, :int(n[i])].clone())
                for i in range(R)]

    def _sample_generate(self, requests, max_new_tokens, seeds) -> List[Continuation]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from ..generation import left_pad

        dev = next(self.model.parameters()).device
        ids, amask = left_pad([list(map(int, r)) for r in requests], self.pad_id, dev)  # [R, L]
        L = ids.shape[1]
        caps = torch.tensor([int(m) for m in max_new_tokens], dtype=torch.long)  # [R]
        proc = _GumbelProcessor(seeds, self.temperature)
        cfg = GenerationConfig(do_sample=False, max_new_tokens=int(caps.max()), pad_token_id=self.pad_id,
                               eos_token_id=self.eos_ids, use_cache=True)
        out = self.model.generate(input_ids=ids, attention_mask=amask, generation_config=cfg,
                                  logits_processor=LogitsProcessorList([proc]),
                                  stopping_criteria=StoppingCriteriaList([_RowCap(caps, L)]),
                                  synced_gpus=self.synced)  # [R, L + T']
        comp = out[:, L:].cpu()  # [R, T']
        steps = len(proc.logps)
        lp = torch.stack(proc.logps, 1)[:, :comp.shape[1]] if steps else torch.zeros(len(requests), 0)  # [R, T']
        ent = torch.stack(proc.ents, 1)[:, :comp.shape[1]] if steps else torch.zeros(len(requests), 0)  # [R, T']
        is_eos = torch.zeros_like(comp, dtype=torch.bool)  # [R, T']
        for e in self.eos_ids:
            is_eos |= comp == e
        res = []
        for i in range(len(requests)):
            n = min(int(caps[i]), comp.shape[1])
            hits = is_eos[i, :n].nonzero()
            if len(hits):
                n = int(hits[0, 0]) + 1
            res.append(Continuation(comp[i, :n].tolist(), lp[i, :n].float().clone(), ent[i, :n].float().clone()))
        return res


# ----------------------------------------------------------------------------- the result
@dataclass
class TreeRollout:
    """``B = K * spec.leaves`` rows; rows ``[k L, (k + 1) L)`` belong to prompt ``k`` (``L`` leaves).

    Inside a group, rows are in slot order: the roots, then each round's children by parent, fork
    and branch. ``fork_pos[i]`` tokens of row ``i`` are copied from row ``parent[i]`` (tokens, old
    log-probs, entropies); its own tokens start there."""

    prompt_ids: torch.Tensor       # [B, P] long, left padded
    prompt_mask: torch.Tensor      # [B, P] long (1 = real token)
    completion_ids: torch.Tensor   # [B, T] long, pad after the end
    completion_mask: torch.Tensor  # [B, T] bool (True = token of the completion, EOS included)
    old_logprobs: torch.Tensor     # [B, T] float32 sampling log-probs (0 at masked positions)
    entropies: torch.Tensor        # [B, T] float32 sampling entropies (0 at masked positions)
    group_ids: torch.Tensor        # [B] long: the prompt of each row
    parent: torch.Tensor           # [B] long: the row it forked from (-1 for a root)
    fork_pos: torch.Tensor         # [B] long: tokens shared with the parent (0 for a root)
    depth: torch.Tensor            # [B] long: the round that made the row (0 for a root)
    spec: TreeSpec = field(default_factory=TreeSpec)
    fallback: Dict[str, int] = field(default_factory=dict)  # too-short leaves: relaxed_gap, at_own_fork
    texts: List[str] = field(default_factory=list)
    #: ``pipeline=True`` only: decode_steps (model forward calls), spawned_rows / dropped_rows (branch
    #: rows started / abandoned when a leaf's picks moved), dropped_tokens (tokens those decoded),
    #: late_spawns (branch rows started after their fork position: cache rows with a hole)
    pipeline_stats: Dict[str, int] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def group_size(self) -> int:
        return self.spec.leaves

    @property
    def row_tokens(self) -> int:
        """Completion tokens over all rows (what training runs over)."""
        return int(self.completion_mask.sum())

    @property
    def generated_tokens(self) -> int:
        """Tokens the backend generated: a shared token counts once."""
        return int((self.completion_mask.sum(1) - self.fork_pos).sum())

    def to_tensordict(self, rewards: Optional[torch.Tensor] = None, *, device=None):
        """The rows as the ``TensorDict`` the recipe's TorchRL stages read (``recipes/grpo.py``):
        :func:`creditlib.modules.credit_pipeline` and :class:`creditlib.losses.GRPOLambdaLoss` take it
        unchanged. ``batch_size = [B]``; keys:

        * ``("tokens", "prompt")`` ``[B, P]`` long (left padded), ``("masks", "prompt")`` ``[B, P]``;
        * ``("tokens", "response")`` ``[B, T]`` long, ``("masks", "response")`` ``[B, T]`` bool;
        * ``("log_probs", "response")`` ``[B, T]`` float32: the sampling (old) log-probs, shared
          prefix tokens included (copied from the parent row);
        * ``"entropy"`` ``[B, T]`` float32: the sampling entropies (what ``EntropySelect`` reads);
        * ``"group_id"`` ``[B]`` long: the prompt of each row (rows are grouped, so
          ``group_size = spec.leaves`` works as well);
        * ``"reward"`` ``[B, 1, 1]`` when ``rewards`` (``[B]``) is given: ``GRPOLoss``'s shape.

        The keys of the pipeline: ``credit_pipeline(NAME, group_size=rollout.group_size,
        tokens_key=("tokens", "response"), mask_key=("masks", "response"), keepdim=True)``; of the
        loss: ``loss_fn.set_keys(action=("tokens", "response"), sample_log_prob=("log_probs", "response"))``
        with a :class:`creditlib.rl.policy.CompletionPolicy` actor.
        """
        from .._extras import require

        require("torchrl", "TreeRollout.to_tensordict")
        from tensordict import TensorDict

        B = self.batch_size
        data = {"tokens": {"prompt": self.prompt_ids, "response": self.completion_ids},  # [B, P], [B, T]
                "masks": {"prompt": self.prompt_mask, "response": self.completion_mask},  # [B, P], [B, T]
                "log_probs": {"response": self.old_logprobs},  # [B, T]
                "entropy": self.entropies,  # [B, T]
                "group_id": self.group_ids}  # [B]
        if rewards is not None:
            if not isinstance(rewards, torch.Tensor) or rewards.numel() != B or rewards.is_complex() \
                    or not (rewards.is_floating_point() or rewards.dtype == torch.bool):
                raise ValueError(f"rewards must be a float tensor of {B} values (one per row), got "
                                 f"{getattr(rewards, 'dtype', type(rewards).__name__)} "
                                 f"{tuple(getattr(rewards, 'shape', ()))}")
            data["reward"] = rewards.float().reshape(B, 1, 1)  # [B, 1, 1]
        td = TensorDict(data, batch_size=[B])
        return td.to(device) if device is not None else td

    def summary(self) -> Dict[str, Any]:
        """Numbers to log per step: rows, tokens, the tree's shape, fallback forks."""
        child = self.parent >= 0  # [B]
        return {"rows": self.batch_size, "generated_tokens": self.generated_tokens, "row_tokens": self.row_tokens,
                "token_ratio": self.generated_tokens / max(1, self.row_tokens),
                "fork_pos_mean": float(self.fork_pos[child].float().mean()) if bool(child.any()) else 0.0,
                "fallback_relaxed_gap": int(self.fallback.get("relaxed_gap", 0)),
                "fallback_at_own_fork": int(self.fallback.get("at_own_fork", 0))}


class _Leaf:
    __slots__ = ("prompt", "slot", "parent", "fork", "depth", "tokens", "logprobs", "entropies")

    def __init__(self, prompt, slot, parent, fork, depth, tokens, logprobs, entropies):
        self.prompt, self.slot, self.parent, self.fork, self.depth = prompt, slot, parent, fork, depth
        self.tokens, self.logprobs, self.entropies = tokens, logprobs, entropies


def _prompts(prompt_ids, prompt_mask) -> List[List[int]]:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.is_floating_point():
        raise ValueError(f"prompt_ids must be an integer tensor [K, P], got "
                         f"{getattr(prompt_ids, 'dtype', type(prompt_ids).__name__)} "
                         f"{tuple(getattr(prompt_ids, 'shape', ()))}")
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask must be a tensor of shape {tuple(prompt_ids.shape)} (1 = real token)")
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids must hold at least one prompt")
    m = prompt_mask.bool().cpu()
    out = [prompt_ids[k].cpu()[m[k]].tolist() for k in range(prompt_ids.shape[0])]
    for k, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {k} has no real token (prompt_mask row {k} is all 0)")
    return out


def _check_sampler_args(spec, max_new_tokens, group_size, seed) -> int:
    if not isinstance(spec, TreeSpec):
        raise ValueError(f"spec must be a creditlib.rl.tree.TreeSpec, got {type(spec).__name__}")
    _count("max_new_tokens", max_new_tokens, 1)
    if group_size is not None:
        spec.check_group_size(group_size)
    if seed is None:
        return int(torch.randint(0, 2 ** 62, (1,)))
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return int(seed)


def select_forks(entropies: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, spec: TreeSpec,
                 keys: Optional[torch.Tensor] = None):
    """Fork positions of ``R`` leaves at once (the rule in the module docstring).

    Args:
        entropies: float ``[R, T]`` per-token sampling entropies (right padded).
        starts: int64 ``[R]`` each leaf's own fork point ``s`` (0 for a root).
        lengths: int64 ``[R]`` each leaf's length ``n``.
        spec: the tree spec (``forks``, ``select``, ``min_gap``, ``segment_len``).
        keys: float ``[R, T]`` random keys for ``select="uniform"``.
    Returns:
        ``(pos, stage)``: int64 ``[R, N]`` positions in pick order and ``[R, N]`` how each was found
        (0: allowed, ``min_gap`` apart; 1: allowed, gap relaxed; 2: the leaf's own fork point).
    """
    R, T = entropies.shape
    t = torch.arange(T)[None, :]  # [1, T]
    allowed = (t >= starts[:, None] + spec.min_gap) & (t <= lengths[:, None] - 2)  # [R, T]
    if spec.select == "entropy":
        key = entropies.float()  # [R, T]
    elif spec.select == "uniform":
        key = keys.float()  # [R, T]
    else:
        allowed &= ((t - starts[:, None]) % spec.segment_len) == 0
        key = -t.expand(R, T).float()  # [R, T] earliest first
    ninf = torch.tensor(float("-inf"))
    gap_ok = allowed.clone()  # [R, T] allowed and min_gap from every pick so far
    chosen = torch.zeros(R, T, dtype=torch.bool)  # [R, T]
    pos = torch.empty(R, spec.forks, dtype=torch.long)  # [R, N]
    stage = torch.empty(R, spec.forks, dtype=torch.long)  # [R, N]
    for j in range(spec.forks):
        c1 = gap_ok & ~chosen  # [R, T]
        c2 = allowed & ~chosen  # [R, T]
        p1 = torch.where(c1, key, ninf).argmax(1)  # [R] first maximum: ties go to the earlier position
        p2 = torch.where(c2, key, ninf).argmax(1)  # [R]
        has1, has2 = c1.any(1), c2.any(1)  # [R]
        p = torch.where(has1, p1, torch.where(has2, p2, starts))  # [R]
        st = torch.where(has1, 0, torch.where(has2, 1, 2))  # [R]
        pos[:, j], stage[:, j] = p, st
        pick = (st < 2)[:, None] & (t == p[:, None])  # [R, T]
        chosen |= pick
        gap_ok &= ((t - p[:, None]).abs() >= spec.min_gap) | (st == 2)[:, None]
    return pos, stage


def _assemble(leaves: List[_Leaf], prompts: List[List[int]], spec: TreeSpec, pad_id: int,
              fallback: Dict[str, int], tokenizer=None, stats: Optional[Dict[str, int]] = None) -> TreeRollout:
    """Rows in (prompt, slot) order -> :class:`TreeRollout`."""
    from ..generation import left_pad

    leaves = sorted(leaves, key=lambda x: (x.prompt, x.slot))
    B = len(leaves)
    Lg = spec.leaves
    T = max(len(x.tokens) for x in leaves)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
    lp = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    ent = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    for i, x in enumerate(leaves):
        n = len(x.tokens)
        ids[i, :n] = torch.tensor(x.tokens, dtype=torch.long)
        mask[i, :n] = True
        lp[i, :n] = x.logprobs
        ent[i, :n] = x.entropies
    pids, pmask = left_pad([prompts[x.prompt] for x in leaves], pad_id)  # [B, P]
    gid = torch.tensor([x.prompt for x in leaves], dtype=torch.long)  # [B]
    parent = torch.tensor([-1 if x.parent < 0 else x.prompt * Lg + x.parent for x in leaves], dtype=torch.long)  # [B]
    fork = torch.tensor([x.fork for x in leaves], dtype=torch.long)  # [B]
    depth = torch.tensor([x.depth for x in leaves], dtype=torch.long)  # [B]
    texts = tokenizer.batch_decode(ids.masked_fill(~mask, pad_id), skip_special_tokens=True) if tokenizer else []
    return TreeRollout(pids, pmask, ids, mask, lp, ent, gid, parent, fork, depth, spec, dict(fallback), texts,
                       dict(stats or {}))


def _log_fallback(fallback: Dict[str, int], spec: TreeSpec, K: int) -> None:
    if fallback["relaxed_gap"] or fallback["at_own_fork"]:
        logger.info("tree rollout: %d of %d forks on leaves too short for %s: %d with min_gap relaxed, "
                    "%d at the leaf's own fork point", fallback["relaxed_gap"] + fallback["at_own_fork"],
                    fallback["forks"], spec, fallback["relaxed_gap"], fallback["at_own_fork"])


def sample_tree(backend: TreeBackend, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, spec: TreeSpec, *,
                max_new_tokens: int, seed: Optional[int] = None, group_size: Optional[int] = None,
                tokenizer=None, pad_id: Optional[int] = None, pipeline: bool = False,
                spawn_delay: int = 0) -> TreeRollout:
    """Sample ``spec.leaves`` rows per prompt, batched: one backend call per round for all prompts.

    Args:
        backend: a :class:`TreeBackend`.
        prompt_ids, prompt_mask: ``[K, P]`` left-padded prompts (mask: 1 = real token).
        spec: the tree shape.
        max_new_tokens: the completion length cap ``T`` (a child forked at ``k`` may add ``T - k``).
        seed: the tree's seed (see :func:`node_seed`); None draws one from torch's global generator.
        group_size: the group size the trainer expects: a ``ValueError`` unless it equals
            ``spec.leaves``.
        tokenizer: decodes ``texts`` when given (and supplies the pad id).
        pad_id: pad id of the returned tensors (default: the tokenizer's, else the first EOS id).
        pipeline: decode the whole tree in one loop, every branch beside its parent (a backend with
            ``step_decoder()``: :class:`TransformersBackend` with ``decode="loop"``, or
            :class:`CallableBackend`; any ``select``). After every step each live leaf runs
            :func:`select_forks` on its confirmed positions (``k`` is confirmed once token ``k`` is
            drawn and is neither an EOS nor at the cap); the ``Bf`` branches of each current pick
            decode in the same batch (cache rows copied from the leaf, cut to ``prompt + o[:k]``
            by masking later columns out; token ``k`` drawn from the leaf's log-probs of step
            ``k``) and are dropped when the pick moves. Same seeds, slots, fork rule and
            fallbacks, so the same tree as ``pipeline=False`` up to floating point (in float64 the
            tokens are equal), in about ``max_new_tokens`` sequential decode steps instead of
            ``T + (T - k)`` per depth. :attr:`TreeRollout.pipeline_stats` counts the steps and the
            wasted (dropped) rows.
        spawn_delay: ``pipeline=True`` only: start a pick's branches once it lies this many
            positions behind the leaf's newest token (``>= 0``; the branches then start with a
            masked-out hole in their cache row). 0 (default): at once, the fewest sequential steps;
            larger: fewer branch rows started and dropped (picks that are beaten within
            ``spawn_delay`` tokens never get rows), up to ``spawn_delay`` more steps; ``>=
            max_new_tokens``: every branch starts when its parent ends (the two-round tree in one
            loop, no row wasted). The tree is the same for every value.
    Returns:
        a :class:`TreeRollout` of ``K * spec.leaves`` rows.
    """
    seed = _check_sampler_args(spec, max_new_tokens, group_size, seed)
    if not isinstance(backend, TreeBackend):
        raise ValueError(f"backend must implement TreeBackend (sample(requests, max_new_tokens, seeds), eos_ids), "
                         f"got {type(backend).__name__}")
    if not isinstance(pipeline, bool):
        raise ValueError(f"pipeline must be a bool, got {pipeline!r}")
    if isinstance(spawn_delay, bool) or not isinstance(spawn_delay, Integral) or int(spawn_delay) < 0:
        raise ValueError(f"spawn_delay must be an int >= 0, got {spawn_delay!r}")
    if spawn_delay and not pipeline:
        raise ValueError(f"spawn_delay={spawn_delay} needs pipeline=True (the two-round sampler starts every "
                         "branch after its parent ends)")
    if pipeline:
        if not callable(getattr(backend, "step_decoder", None)):
            raise ValueError(f"pipeline=True needs a backend with step_decoder() (TransformersBackend with "
                             f"decode='loop', or CallableBackend), got {type(backend).__name__}")
    prompts = _prompts(prompt_ids, prompt_mask)
    K = len(prompts)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = int(backend.eos_ids[0]) if pad_id is None else int(pad_id)
    fallback = {"forks": 0, "relaxed_gap": 0, "at_own_fork": 0}
    if pipeline:
        stats: Dict[str, int] = {}
        every = _sample_tree_pipelined(backend, prompts, spec, max_new_tokens, seed, fallback, stats, int(spawn_delay))
        _log_fallback(fallback, spec, K)
        return _assemble(every, prompts, spec, pad_id, fallback, tokenizer, stats)
    # round 0: the roots of every prompt, one call
    reqs, caps, seeds, meta = [], [], [], []
    for k in range(K):
        for m in range(spec.roots):
            reqs.append(prompts[k])
            caps.append(max_new_tokens)
            seeds.append(node_seed(seed, k, m))
            meta.append((k, m, -1, 0, None))
    next_slot = [spec.roots] * K
    every: List[_Leaf] = []
    frontier: List[_Leaf] = []
    for d in range(spec.depth + 1):
        outs = backend.sample(reqs, caps, seeds)
        if len(outs) != len(reqs):
            raise RuntimeError(f"backend returned {len(outs)} continuations for {len(reqs)} requests")
        frontier = []
        for (k, slot, par, fork, pl), c in zip(meta, outs):
            if len(c.tokens) == 0:
                raise RuntimeError("backend returned an empty continuation (at least one token is required)")
            if pl is None:
                leaf = _Leaf(k, slot, par, fork, d, list(c.tokens), c.logprobs.float(), c.entropies.float())
            else:
                leaf = _Leaf(k, slot, par.slot, fork, d, pl.tokens[:fork] + list(c.tokens),
                             torch.cat([pl.logprobs[:fork], c.logprobs.float()]),
                             torch.cat([pl.entropies[:fork], c.entropies.float()]))
            frontier.append(leaf)
        every.extend(frontier)
        if d == spec.depth:
            break
        # fork every leaf of this round (all prompts at once)
        R = len(frontier)
        Tm = max(len(x.tokens) for x in frontier)
        ent = torch.zeros(R, Tm)  # [R, Tm]
        keys = torch.zeros(R, Tm) if spec.select == "uniform" else None  # [R, Tm]
        for r, x in enumerate(frontier):
            ent[r, :len(x.tokens)] = x.entropies
            if keys is not None:
                g = torch.Generator().manual_seed(node_seed(seed, x.prompt, x.slot, salt=1))
                keys[r, :len(x.tokens)] = torch.rand(len(x.tokens), generator=g)
        starts = torch.tensor([x.fork for x in frontier], dtype=torch.long)  # [R]
        lens = torch.tensor([len(x.tokens) for x in frontier], dtype=torch.long)  # [R]
        pos, stage = select_forks(ent, starts, lens, spec, keys)  # [R, N] each
        fallback["forks"] += pos.numel()
        fallback["relaxed_gap"] += int((stage == 1).sum())
        fallback["at_own_fork"] += int((stage == 2).sum())
        reqs, caps, seeds, meta = [], [], [], []
        for r, x in enumerate(frontier):
            for j in range(spec.forks):
                kf = int(pos[r, j])
                for _ in range(spec.branches):
                    slot = next_slot[x.prompt]
                    next_slot[x.prompt] += 1
                    reqs.append(prompts[x.prompt] + x.tokens[:kf])
                    caps.append(max_new_tokens - kf)
                    seeds.append(node_seed(seed, x.prompt, slot))
                    meta.append((x.prompt, slot, x, kf, x))
    _log_fallback(fallback, spec, K)
    return _assemble(every, prompts, spec, pad_id, fallback, tokenizer)



# ----------------------------------------------------------------------------- pipelined trees
class _StepDecoder(Protocol):
    """What the pipelined sampler needs from a backend: a step-wise decoder over a batch of rows.

    ``prefill(requests) -> [R, V]`` next-token logits of each request (token-id lists), starting a
    new batch; ``select(rows, keep=None)`` keeps (and copies: ``rows`` may repeat) rows of the
    batch, in that order, row ``i`` cut to its first ``keep[i]`` real tokens (prompt included) when
    ``keep[i]`` is not None; ``step(tokens [R]) -> [R, V]`` appends one token to each row and
    returns the next logits.
    Used as a context manager (eval mode, no grad)."""

    def prefill(self, requests: List[List[int]]) -> torch.Tensor: ...

    def select(self, rows: List[int], keep: Optional[List[Optional[int]]] = None) -> None: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


class _SeqStepDecoder:
    """:class:`CallableBackend`'s step decoder: the token sequences themselves."""

    def __init__(self, backend: "CallableBackend"):
        self.fn = backend.next_logits
        self.seqs: List[List[int]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _logits(self) -> torch.Tensor:
        logits = self.fn(self.seqs)  # [R, V]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(self.seqs):
            raise ValueError(f"next_logits must return a [R, V] tensor for R = {len(self.seqs)} sequences, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        return logits

    def prefill(self, requests):
        self.seqs = [list(map(int, r)) for r in requests]
        return self._logits()

    def select(self, rows, keep=None):
        keep = keep or [None] * len(rows)
        self.seqs = [list(self.seqs[i][:k]) if k is not None else list(self.seqs[i]) for i, k in zip(rows, keep)]

    def step(self, tokens):
        for s, t in zip(self.seqs, tokens.tolist()):
            s.append(int(t))
        return self._logits()


class _KVStepDecoder:
    """:class:`TransformersBackend`'s step decoder: the model's forward over a ``DynamicCache``
    (the same calls as ``decode="loop"``). ``select`` indexes the cache's batch dimension, so a row
    copied from its parent carries the parent's keys and values, padding and positions included."""

    def __init__(self, backend: "TransformersBackend"):
        self.model, self.pad_id = backend.model, backend.pad_id
        self.dev = next(self.model.parameters()).device
        self.ck = _cache_kwarg(self.model)
        self.cache = None
        self.amask: Optional[torch.Tensor] = None  # [R, L] 1 = real token

    def __enter__(self):
        self._was_training = self.model.training
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self.model.train(self._was_training)
        self.cache = self.amask = None
        return False

    def prefill(self, requests):
        from transformers import DynamicCache

        from ..generation import left_pad

        reqs = [tuple(int(t) for t in r) for r in requests]
        first: Dict[tuple, int] = {}
        inv = torch.tensor([first.setdefault(r, len(first)) for r in reqs], dtype=torch.long,
                           device=self.dev)  # [R] request -> its unique prefix
        ids, amask = left_pad(list(first), self.pad_id, self.dev)  # [U, L]
        pos = (amask.cumsum(-1) - 1).clamp_min(0)  # [U, L]
        self.cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=amask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.ck: self.cache})
        if len(first) < len(reqs):  # identical requests: one prefill, copied cache rows
            self.cache.batch_select_indices(inv)
        self.amask = amask.index_select(0, inv)  # [R, L]
        return out.logits[:, -1].index_select(0, inv)  # [R, V]

    def select(self, rows, keep=None):
        idx = torch.tensor(rows, dtype=torch.long, device=self.dev)  # [R']
        self.cache.batch_select_indices(idx)
        self.amask = self.amask.index_select(0, idx)  # [R', L]
        if keep is not None and any(k is not None for k in keep):
            # a hole: the columns after the row's keep[i]-th real token are masked out; the next
            # token's position is the count of real tokens (step), so positions go on from the cut
            lim = torch.tensor([self.amask.shape[1] if k is None else int(k) for k in keep], dtype=torch.long,
                               device=self.dev)  # [R']
            self.amask = self.amask.masked_fill(self.amask.cumsum(-1) > lim[:, None], 0)  # [R', L]

    def step(self, tokens):
        self.amask = torch.cat([self.amask, self.amask.new_ones(self.amask.shape[0], 1)], 1)  # [R, L + 1]
        out = self.model(input_ids=tokens.to(self.dev)[:, None], attention_mask=self.amask,
                         position_ids=self.amask.sum(-1, keepdim=True) - 1, use_cache=True, **{self.ck: self.cache})
        return out.logits[:, -1]  # [R, V]


class _Node:
    """A node of a pipelined tree while it decodes: ``tokens`` / ``lps`` / ``ents`` hold the whole
    completion so far (the first ``fork`` copied from the parent). A node that forks (``depth <
    spec.depth``) also keeps ``entbuf`` (float32 ``[T]`` its entropies, for :func:`select_forks`),
    ``keys`` (float32 ``[T]`` its ``"uniform"`` keys), ``steplp`` (position ``k`` -> the ``[V]``
    log-probs it drew token ``k`` from: what a branch forked at ``k`` draws its token ``k`` from)
    and ``groups`` (pick rank ``j`` -> ``(k, its Bf branch nodes)``: the branches now decoding)."""

    __slots__ = ("prompt", "slot", "parent", "fork", "depth", "tokens", "lps", "ents", "gen", "entbuf", "keys",
                 "steplp", "groups", "stage", "done", "dropped", "src", "keep")

    def __init__(self, prompt, slot, parent, fork, depth, tokens, lps, ents, seed):
        self.prompt, self.slot, self.parent, self.fork, self.depth = prompt, slot, parent, fork, depth
        self.tokens, self.lps, self.ents = tokens, lps, ents
        self.gen = torch.Generator().manual_seed(int(seed))
        self.entbuf = self.keys = None
        self.steplp: Dict[int, torch.Tensor] = {}
        self.groups: Dict[int, tuple] = {}
        self.stage: Optional[List[int]] = None  # the final selection's stages (set when the node ends)
        self.done = self.dropped = False
        self.src, self.keep = -1, None  # row of the decode batch its cache row is copied from; real tokens kept

    def leaf(self) -> "_Leaf":
        return _Leaf(self.prompt, self.slot, self.parent, self.fork, self.depth, list(self.tokens),
                     torch.tensor(self.lps, dtype=torch.float32), torch.tensor(self.ents, dtype=torch.float32))


def _child_slot(spec: TreeSpec, parent_slot: int, parent_depth: int, j: int, b: int) -> int:
    """The slot the two-round sampler gives branch ``b`` of fork ``j`` of a leaf: every leaf of a round
    has ``F = forks * branches`` children, in the order of the leaves (slots) of that round, so round
    ``d`` starts at slot ``base_d = roots * sum_{e<d} F^e``."""
    F = spec.forks * spec.branches
    base = [spec.roots * sum(F ** e for e in range(d)) for d in (parent_depth, parent_depth + 1)]
    return base[1] + (parent_slot - base[0]) * F + j * spec.branches + b


class _Speculative:
    """The pipelined sampler's state: every node made, the counters (:attr:`TreeRollout.pipeline_stats`)."""

    def __init__(self, prompts: List[List[int]], spec: TreeSpec, T: int, seed: int, eos: set, delay: int = 0):
        self.prompts, self.spec, self.T, self.seed, self.eos, self.delay = prompts, spec, T, seed, eos, delay
        # gap never binds when min_gap == 1 or between segment positions (S >= min_gap apart): the picks
        # are then the top N allowed positions by key, a position outside them never returns, and only
        # the picks' (and the own fork point's) log-probs need keeping
        self.prune = spec.min_gap == 1 or spec.select == "segment"
        self.every: List[_Node] = []
        self.stats = {"decode_steps": 0, "spawned_rows": 0, "dropped_rows": 0, "dropped_tokens": 0,
                      "late_spawns": 0}

    def node(self, prompt, slot, parent, fork, depth, tokens, lps, ents, entbuf) -> _Node:
        x = _Node(prompt, slot, parent, fork, depth, tokens, lps, ents, node_seed(self.seed, prompt, slot))
        if depth < self.spec.depth:
            x.entbuf = torch.zeros(self.T) if entbuf is None else entbuf.clone()  # [T] float32
            if self.spec.select == "uniform":  # rand(T)[:n] == rand(n): the two-round sampler's keys
                g = torch.Generator().manual_seed(node_seed(self.seed, prompt, slot, salt=1))
                x.keys = torch.rand(self.T, generator=g)  # [T]
        self.every.append(x)
        return x

    def record(self, xs: List[_Node], lp: torch.Tensor, ent: torch.Tensor) -> None:
        """Draw one token for each node of ``xs`` from its own generator (``lp`` ``[n, V]``, ``ent``
        ``[n]``), append it, and mark the nodes that ended (EOS or cap)."""
        tok = _draw(lp, [x.gen for x in xs])  # [n] cpu
        tlp = lp.gather(1, tok.to(lp.device)[:, None]).squeeze(1).float().cpu().tolist()
        tl, te = tok.tolist(), ent.float().cpu().tolist()
        for r, x in enumerate(xs):
            k = len(x.tokens)
            x.tokens.append(tl[r])
            x.lps.append(tlp[r])
            x.ents.append(te[r])
            if x.entbuf is not None:
                x.entbuf[k] = te[r]
                x.steplp[k] = lp[r].clone()  # [V] (a copy: a view would keep the whole [n, V] step alive)
            x.done = tl[r] in self.eos or len(x.tokens) >= self.T

    def drop(self, x: _Node) -> None:
        if x.dropped:
            return
        x.dropped = True
        self.stats["dropped_rows"] += 1
        self.stats["dropped_tokens"] += len(x.tokens) - x.fork
        x.steplp = {}
        for _, kids in x.groups.values():
            for c in kids:
                self.drop(c)

    def reconcile(self, xs: List[_Node]) -> List[tuple]:
        """Run :func:`select_forks` on what each node of ``xs`` has confirmed (a live node's positions
        up to its last drawn token: it will draw another; an ended node's whole length: final) and
        make the decoding branches match it: a rank whose pick moved loses its branches (and their
        subtrees), a pick without branches gets ``Bf`` new ones (slots of its rank) once it lies
        ``delay`` positions behind the newest confirmed one (at once for ``delay=0``; every pick
        of an ended node at once). Picks at the node's own fork point (stage 2) are taken only when
        the node has ended. Returns the new branches as ``(node, parent, k)``."""
        spec = self.spec
        xs = [x for x in xs if not x.dropped]
        if not xs:
            return []
        ent = torch.stack([x.entbuf for x in xs])  # [R, T]
        keys = torch.stack([x.keys for x in xs]) if spec.select == "uniform" else None  # [R, T]
        starts = torch.tensor([x.fork for x in xs], dtype=torch.long)  # [R]
        lens = torch.tensor([len(x.tokens) + (0 if x.done else 1) for x in xs], dtype=torch.long)  # [R]
        pos, stage = select_forks(ent, starts, lens, spec, keys)  # [R, N] each
        new = []
        for x, p_r, s_r in zip(xs, pos.tolist(), stage.tolist()):
            if x.dropped:  # by an ancestor earlier in this loop
                continue
            last = len(x.tokens) - 1  # the newest confirmed position (of a live node)
            want = {j: p for j, (p, s) in enumerate(zip(p_r, s_r)) if x.done or (s < 2 and last - p >= self.delay)}
            for j in list(x.groups):
                if want.get(j) != x.groups[j][0]:
                    for c in x.groups.pop(j)[1]:
                        self.drop(c)
            for j, k in want.items():
                if j in x.groups:
                    continue
                kids = [self.node(x.prompt, _child_slot(spec, x.slot, x.depth, j, b), x.slot, k, x.depth + 1,
                                  x.tokens[:k], x.lps[:k], x.ents[:k], x.entbuf) for b in range(spec.branches)]
                x.groups[j] = (k, kids)
                new += [(c, x, k) for c in kids]
                self.stats["spawned_rows"] += spec.branches
                self.stats["late_spawns"] += spec.branches * (k < len(x.tokens) - 1)
            if x.done:
                x.stage = s_r
            elif self.prune:
                keep = {p for p, s in zip(p_r, s_r) if s < 2} | {x.fork}  # spawned or not yet (delay)
                x.steplp = {k: v for k, v in x.steplp.items() if k in keep}
        return new


def _speculative_call(dec, st: _Speculative, roots: List[_Node], temperature: float) -> None:
    """Decode the whole tree in one loop: the roots, and every branch beside its parent.

    After each step, every forking node that drew a token runs :meth:`_Speculative.reconcile`; new
    branches draw their token ``k`` at once from the parent's stored log-probs of step ``k`` with
    their own generators (and, ending at once, may fork themselves in the same step), then join the
    batch: their cache row is a copy of the row their prefix lies in, cut to ``prompt + o[:k]``
    (``select(rows, keep)``: the columns after the ``len(prompt) + k``-th real token are masked
    out, and the positions continue from the real tokens kept). Dropped branches leave the batch."""
    logits = dec.prefill([st.prompts[x.prompt] + x.tokens for x in roots])  # [R, V]
    st.stats["decode_steps"] += 1
    live = list(roots)
    D = st.spec.depth
    while True:
        lp, ent = _tempered(logits, temperature)  # [n, V], [n]
        for r, x in enumerate(live):
            x.src, x.keep = r, None
        st.record(live, lp, ent)
        spawned: List[_Node] = []
        todo = [x for x in live if x.depth < D]
        while todo:
            new = st.reconcile(todo)
            new = [(c, x, k) for c, x, k in new if not c.dropped]
            todo = []
            if new:
                rows = torch.stack([x.steplp[k] for _, x, k in new])  # [s, V]
                ents = torch.tensor([x.ents[k] for _, x, k in new], dtype=torch.float32)  # [s]
                kids = [c for c, _, _ in new]
                for c, x, k in new:
                    c.src, c.keep = x.src, len(st.prompts[x.prompt]) + k
                st.record(kids, rows, ents)
                spawned += kids
                todo = [c for c in kids if c.depth < D]
        for x in st.every:  # ended nodes: their selection is final, their log-probs no longer needed
            if x.done and x.steplp:
                x.steplp = {}
        nxt = [x for x in live + spawned if not x.done and not x.dropped]
        if not nxt:
            return
        rows = [x.src for x in nxt]
        keep = [x.keep for x in nxt]
        if rows != list(range(len(live))) or any(k is not None for k in keep):
            dec.select(rows, keep)
        live = nxt
        logits = dec.step(torch.tensor([x.tokens[-1] for x in live], dtype=torch.long))  # [n', V]
        st.stats["decode_steps"] += 1


def _sample_tree_pipelined(backend, prompts: List[List[int]], spec: TreeSpec, T: int, seed: int,
                           fallback: Dict[str, int], stats: Dict[str, int], delay: int = 0) -> List[_Leaf]:
    """The tree of :func:`sample_tree` (any ``select``), every branch decoded beside its parent
    (:func:`_speculative_call`), in one decode loop. The branches that survive are exactly those of
    each ended node's final :func:`select_forks` (its ``N`` picks in pick order, slots of the
    two-round sampler); the fallback counts are those final selections'."""
    st = _Speculative(prompts, spec, T, seed, set(int(e) for e in backend.eos_ids), delay)
    roots = [st.node(k, m, -1, 0, 0, [], [], [], None) for k in range(len(prompts)) for m in range(spec.roots)]
    with backend.step_decoder() as dec:
        _speculative_call(dec, st, roots, backend.temperature)
    kept = [x for x in st.every if not x.dropped]
    for x in kept:
        if x.depth < spec.depth:
            if x.stage is None or sorted(x.groups) != list(range(spec.forks)):
                raise RuntimeError("pipelined tree: a leaf ended without its final forks (internal error)")
            fallback["forks"] += spec.forks
            fallback["relaxed_gap"] += sum(s == 1 for s in x.stage)
            fallback["at_own_fork"] += sum(s == 2 for s in x.stage)
    if len(kept) != len(prompts) * spec.leaves:
        raise RuntimeError(f"pipelined tree: {len(kept)} leaves for {len(prompts)} prompts of {spec.leaves} "
                           "(internal error)")
    stats.update(st.stats)
    return [x.leaf() for x in kept]


# ----------------------------------------------------------------------------- vLLM (never run here)
def topk_entropy(logprobs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy estimate from the ``k`` largest log-probs of each distribution (what vLLM returns).

    The ``k`` listed tokens keep their probabilities and the rest of the mass ``r = 1 - sum p`` is
    one lumped outcome: ``H_k = -sum_i p_i log p_i - r log r``. Lumping outcomes never raises the
    entropy, so ``H_k <= H`` (the full entropy), with equality when the listed tokens carry all the
    mass; ``H_k`` never decreases as ``k`` grows. Used as the entropy of :class:`VLLMBackend`
    (``select="entropy"`` ranks fork positions by it).

    Args:
        logprobs: float ``[..., k]`` log-probs of distinct tokens of one distribution (any order;
            ``-inf`` allowed).
        valid: bool ``[..., k]`` which entries are real (default: all).
    Returns:
        float32 ``[...]``.
    """
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point() or logprobs.dim() < 1:
        raise ValueError(f"logprobs must be a float tensor [..., k], got "
                         f"{getattr(logprobs, 'dtype', type(logprobs).__name__)} {tuple(getattr(logprobs, 'shape', ()))}")
    lp = logprobs.double()  # [..., k]
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.shape != logprobs.shape:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(logprobs.shape)}")
        lp = lp.masked_fill(~valid.bool(), float("-inf"))
    if bool((lp > 1e-6).any()):
        raise ValueError("logprobs must be <= 0 (log-probabilities)")
    p = lp.clamp(max=0.0).exp()  # [..., k]
    listed = -(torch.where(p > 0, p * lp, torch.zeros_like(p))).sum(-1)  # [...]
    r = (1.0 - p.sum(-1)).clamp(min=0.0)  # [...] the unlisted mass
    rest = -(torch.where(r > 0, r * torch.log(r.clamp(min=1e-300)), torch.zeros_like(r)))  # [...]
    return (listed + rest).float()


def _vllm_continuation(token_ids: Sequence[int], logprobs: Sequence[Dict[int, float]], eos_ids: Sequence[int],
                       cap: int) -> Continuation:
    """One vLLM completion as a :class:`Continuation`: ``token_ids`` (vLLM's ``CompletionOutput.token_ids``)
    and, per token, ``{token_id: logprob}`` (its ``CompletionOutput.logprobs``, each ``Logprob`` read as
    its ``.logprob``), which holds the top-k tokens and the sampled one. Cut after the first EOS and at
    ``cap``; the sampled token's log-prob is the old log-prob, the top-k estimate the entropy."""
    toks = [int(t) for t in token_ids]
    if len(logprobs) < len(toks):
        raise RuntimeError(f"vLLM returned {len(toks)} tokens but {len(logprobs)} logprob entries: the engine "
                           "must be asked for logprobs (SamplingParams(logprobs=k))")
    eos = set(int(e) for e in eos_ids)
    n = min(len(toks), int(cap))
    for i in range(n):
        if toks[i] in eos:
            n = i + 1
            break
    if n == 0:
        raise RuntimeError("vLLM returned an empty completion (at least one token is required)")
    lps, ents = [], []
    for t, d in zip(toks[:n], logprobs[:n]):
        if t not in d:
            raise RuntimeError(f"vLLM's logprobs of a step do not list its sampled token {t}")
        lps.append(float(d[t]))
        ents.append(torch.tensor(list(d.values()), dtype=torch.float64))
    k = max(len(e) for e in ents)
    table = torch.full((n, k), float("-inf"), dtype=torch.float64)  # [n, k]
    for i, e in enumerate(ents):
        table[i, :len(e)] = e
    return Continuation(toks[:n], torch.tensor(lps, dtype=torch.float32), topk_entropy(table))


def _import_vllm():
    try:
        from vllm import SamplingParams
    except ImportError as e:
        from .._extras import install_hint

        raise ImportError("VLLMBackend needs the vLLM package, which is not installed. Install it on a CUDA "
                          f"machine with `{install_hint('vllm')}` (vLLM's official wheels are CUDA builds), or use "
                          "TransformersBackend.") from e
    return SamplingParams


class VLLMBackend:
    """Tree continuations from a vLLM engine (offline ``LLM.generate``, token-id prompts). NEVER RUN:
    written against vLLM's documented offline API, vLLM cannot run on the CPU this was written on.

    Each request is one vLLM request with its own ``SamplingParams(n=1, seed=<the node's seed>,
    temperature, top_p=1, top_k off, max_tokens=<its cap>, logprobs=entropy_topk,
    stop_token_ids=eos_ids)``: per-request seeds make a request's tokens depend only on its own
    seed (up to the batch-dependent floating point of a GPU). The ``Bf`` branches of one fork are
    ``Bf`` requests with the same token prefix: the engine's prefix cache (``enable_prefix_caching=True``)
    computes that prefix once, which is what ``n=Bf`` would share, while keeping one seed per node.

    Old log-probs: the sampled token's log-prob as vLLM reports it. The engine must report the
    tempered distribution, ``LLM(..., logprobs_mode="processed_logprobs")`` (vLLM >= 0.10.2, as TRL
    sets it); with vLLM's default ``"raw_logprobs"`` they would be those of temperature 1, so the
    backend refuses that engine unless ``temperature == 1``. Entropies: vLLM returns only the top-k
    log-probs, so each step's entropy is :func:`topk_entropy` of them (a lower bound of the true
    entropy, exact when the top ``entropy_topk`` tokens hold all the mass); ``select="entropy"``
    ranks fork positions by that estimate.

    Weights: the engine samples with whatever weights it holds; after each optimizer step load the
    policy's (:meth:`creditlib.generation.VLLMEngine.sync_weights`, which also resets the prefix cache).

    Args:
        llm: a ``vllm.LLM`` (prefix caching on) or a :class:`creditlib.generation.VLLMEngine` (its
            ``llm``; built with ``enable_prefix_caching=True``; pass ``logprobs_mode="processed_logprobs"``
            through its keyword arguments).
        eos_ids: end ids (default: the engine tokenizer's EOS).
        temperature: ``> 0``.
        entropy_topk: log-probs per step requested from vLLM (``1 <= k <=`` the engine's ``max_logprobs``,
            vLLM's default 20).
    """

    def __init__(self, llm, *, eos_ids: Optional[Sequence[int]] = None, temperature: float = 1.0,
                 entropy_topk: int = 20):
        self._SamplingParams = _import_vllm()
        self.llm = getattr(llm, "llm", llm)  # a VLLMEngine or an LLM
        if not hasattr(self.llm, "generate"):
            raise ValueError(f"llm must be a vllm.LLM or a creditlib.generation.VLLMEngine, got {type(llm).__name__}")
        self.temperature = _check_temperature(temperature)
        self.entropy_topk = _count("entropy_topk", entropy_topk, 1)
        if eos_ids is None:
            eos = getattr(self.llm.get_tokenizer(), "eos_token_id", None)
            eos_ids = [] if eos is None else [eos]
        self.eos_ids = sorted({int(e) for e in eos_ids})
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one end-of-sequence id")
        mode = getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "logprobs_mode", None)
        mode = getattr(mode, "value", mode)
        if mode != "processed_logprobs" and self.temperature != 1.0:
            raise ValueError(f"temperature={self.temperature} needs an engine built with "
                             f"logprobs_mode='processed_logprobs' (its log-probs are the tempered distribution's); "
                             f"this engine reports {mode or 'unknown (older vLLM: raw)'} log-probs")
        cfg = getattr(getattr(self.llm, "llm_engine", None), "cache_config", None)
        if cfg is not None and getattr(cfg, "enable_prefix_caching", True) is False:
            raise ValueError("the vLLM engine must be built with enable_prefix_caching=True (the branches of a "
                             "fork share their prefix through it)")

    def sample(self, requests, max_new_tokens, seeds) -> List[Continuation]:
        _check_requests(requests, max_new_tokens, seeds)
        params = [self._SamplingParams(n=1, temperature=self.temperature, top_p=1.0, max_tokens=int(m),
                                       seed=int(s), logprobs=self.entropy_topk, stop_token_ids=list(self.eos_ids),
                                       detokenize=False)
                  for m, s in zip(max_new_tokens, seeds)]
        prompts = [{"prompt_token_ids": [int(t) for t in r]} for r in requests]
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if len(outs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(requests)} requests")
        res = []
        for o, m in zip(outs, max_new_tokens):
            c = o.outputs[0]
            steps = [{int(t): float(lp.logprob) for t, lp in d.items()} for d in (c.logprobs or [])]
            res.append(_vllm_continuation(c.token_ids, steps, self.eos_ids, int(m)))
        return res
