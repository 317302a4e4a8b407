"""Tree rollouts against a flat group at equal leaves (issue 19, "Speed"): one pytest-benchmark case
that measures, in one run and interleaved,

* ``token_ratio``: generated tokens of the default tree (``TreeSpec()``: 2 roots x 1 entropy fork x
  3 branches = 8 leaves) over a flat group of 8 (target <= 0.7);
* ``time_ratio``: rollout wall time of that tree over the flat group, both through
  :class:`creditlib.rl.tree.TransformersBackend` (one ``generate`` call per round), on CPU (target
  <= 1.0); ``time_ratio_vs_generate``: the tree over the recipe's own flat sampler
  (:func:`creditlib.generation.generate_tokens`, ``do_sample``);
* ``prefill_share``: the time of one forward over the fork requests of the tree's second round
  over that round's ``generate`` call: the most that reusing the prefix KV cache could save there;
* the segment tree (``TreeSpec(roots=2, forks=1, branches=3, select="segment", segment_len=S)``,
  8 leaves, ``S`` about half the completion) through the ``decode="loop"`` backend, two-round
  (``seg``) and pipelined (``seg_pipe``: ``sample_tree(..., pipeline=True)``, the branches decode
  beside their root): ``time_ratio_segment`` and ``time_ratio_segment_pipelined`` over the same
  flat group of 8, ``token_ratio_segment`` (generated tokens over the flat group's; the same for
  both, which sample the same tree) and ``pipelined_over_two_round`` (``seg_pipe`` over ``seg``);
* the default entropy tree pipelined (``tree_pipe``: ``sample_tree(..., pipeline=True)`` with
  ``TreeSpec()``, speculative forks: the branches of each root's current pick decode beside it and
  are dropped when a later token beats the pick): ``time_ratio_pipelined`` over the flat group,
  ``entropy_pipelined_over_two_round`` (over ``tree``), the wasted work (``spec_spawned_rows_per_root``,
  ``spec_dropped_rows_per_root``, ``spec_wasted_token_share``: tokens decoded by dropped rows over
  the tree's generated tokens), ``spec_late_spawns`` (branches started after their fork position,
  the fallbacks at a root's own fork point) and ``entropy_same_tree`` (pipelined == two-round);
  ``time_ratio_pipelined_late``: the same tree with ``spawn_delay=T`` (every branch starts when its
  root ends: the two-round tree in one decode loop, no second prefill, no row wasted).

Policy: the bundled task's tokenizer and a tiny Qwen2 (the recipe's shape), warmed up with a few
supervised steps on worked solutions so completions end with EOS near the task's length (a random
policy never stops). Tasks: the bundled walk (``num_ops=10``, 13 tokens) and a longer one
(``num_ops=30``, 33 tokens). Under ``--benchmark-disable`` (CI) one untimed round with a shorter
warm-up; the ratios are printed and kept in ``extra_info``, never asserted.

    .venv/bin/python -m pytest benchmarks/test_bench_tree.py -s -q    # the figures (a few minutes)
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")

K = 8  # prompts per rollout (the recipe's prompts_per_step default)
TEMP = 1.0


def _policy(num_ops: int, sft_steps: int):
    from creditlib.generation import left_pad
    from creditlib.rl.model import tiny_qwen2
    from creditlib.rl.task import ChainTask, build_char_tokenizer

    tok = build_char_tokenizer()
    task = ChainTask(num_ops=num_ops)
    torch.manual_seed(0)
    model = tiny_qwen2(len(tok), max_position_embeddings=4 * num_ops + 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    i = 0
    for _ in range(sft_steps):  # supervised warm-up on worked solutions (prompt + solution + EOS)
        seqs = []
        for _ in range(32):
            p = task.problem("train", i)
            i += 1
            seqs.append(tok(p.prompt + p.solution)["input_ids"] + [tok.eos_token_id])
        ids, mask = left_pad(seqs, tok.pad_token_id)  # [32, L]
        labels = ids.masked_fill(mask == 0, -100)  # [32, L]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # [32, L]
        loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok, task, i


def _measure(model, prompts, T: int, rounds: int, *, tokenizer=None, pad_id=None, eos_ids=None, seg_len: int = 6):
    """Interleaved rollouts (alternating order) of the default tree and a flat group of 8 through
    both decoders of :class:`TransformersBackend`, the segment tree (``segment_len=seg_len``) two-round
    and pipelined, and (with a tokenizer) the recipe's flat sampler. ``prompts``: per round, a list
    of ``K`` prompt token lists. Returns per-kind times and tokens."""
    from creditlib.generation import generate_tokens, left_pad
    from creditlib.rl.tree import TransformersBackend, TreeSpec, sample_tree

    kw = dict(temperature=TEMP, eos_ids=eos_ids, pad_id=pad_id)
    be = {"loop": TransformersBackend(model, tokenizer, decode="loop", **kw),
          "gen": TransformersBackend(model, tokenizer, decode="generate", **kw)}
    pad = be["loop"].pad_id
    tree, flat = TreeSpec(), TreeSpec(roots=8, depth=0)
    seg = TreeSpec(roots=2, forks=1, branches=3, select="segment", segment_len=seg_len)
    assert tree.leaves == flat.leaves == seg.leaves == 8
    kinds = ["tree", "tree_pipe", "tree_pipe_late", "flat", "seg", "seg_pipe", "tree_gen", "flat_gen"]
    kinds += ["generate"] if tokenizer is not None else []
    res = {k: [] for k in kinds + ["prefill", "round2"]}
    res.update({f"{k}_tokens": 0 for k in kinds})
    res["fork_pos"] = []
    res["seg_fallback"] = 0  # forks at the root's own fork point (roots too short for segment_len)
    res["seg_same_tree"] = []
    res["tree_same"] = []
    res["spec"] = {"spawned_rows": 0, "dropped_rows": 0, "dropped_tokens": 0, "late_spawns": 0, "trees": 0}
    for r in range(rounds):
        P = prompts[r]
        ids, mask = left_pad(P, pad)  # [K, P]
        segs = {}
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):  # interleaved, alternating order
            t0 = time.perf_counter()
            if kind == "generate":
                g = generate_tokens(model, tokenizer, ids, mask, 8, max_new_tokens=T, temperature=TEMP)
                n = int(g.completion_mask.sum())
            elif kind.startswith("tree_pipe"):  # late: every branch starts when its root ends (no waste)
                out = sample_tree(be["loop"], ids, mask, tree, max_new_tokens=T, seed=r, pipeline=True,
                                  spawn_delay=T if kind == "tree_pipe_late" else 0)
                n = out.generated_tokens
                segs[kind] = out
            elif kind.startswith("seg"):
                out = sample_tree(be["loop"], ids, mask, seg, max_new_tokens=T, seed=r, pipeline=kind == "seg_pipe")
                n = out.generated_tokens
                segs[kind] = out
            else:
                out = sample_tree(be["gen" if kind.endswith("_gen") else "loop"], ids, mask,
                                  tree if kind.startswith("tree") else flat, max_new_tokens=T, seed=r)
                n = out.generated_tokens
                assert out.batch_size == len(P) * 8
            res[kind].append(time.perf_counter() - t0)
            res[f"{kind}_tokens"] += n
            if kind == "tree":
                tr = out
        res["fork_pos"].append(tr.summary()["fork_pos_mean"])
        # pipelined and two-round: the same tree (float32: up to a rare last-bit tie of the Gumbel argmax)
        res["seg_same_tree"].append(torch.equal(segs["seg"].completion_ids, segs["seg_pipe"].completion_ids))
        res["seg_fallback"] += segs["seg"].fallback["at_own_fork"]
        res["tree_same"].append(torch.equal(tr.completion_ids, segs["tree_pipe"].completion_ids)
                                and torch.equal(tr.completion_ids, segs["tree_pipe_late"].completion_ids))
        for key in ("spawned_rows", "dropped_rows", "dropped_tokens", "late_spawns"):
            res["spec"][key] += segs["tree_pipe"].pipeline_stats[key]
        res["spec"]["trees"] += len(P) * 2  # roots: 2 per prompt, each forks once
        # the tree's second round again, split: one prefill forward of its (distinct) requests vs the
        # round's decode-loop call (which prefills each distinct prefix once)
        req, caps = [], []
        for i in range(tr.batch_size):
            if int(tr.parent[i]) >= 0:
                k = int(tr.fork_pos[i])
                req.append(P[int(tr.group_ids[i])] + tr.completion_ids[i, :k].tolist())
                caps.append(T - k)
        x, m = left_pad(sorted({tuple(q) for q in req}), pad)  # [U, L]
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=x, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                  logits_to_keep=1)
        res["prefill"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        be["loop"].sample(req, caps, list(range(len(req))))
        res["round2"].append(time.perf_counter() - t0)
    return res


def _ratios(res, rounds: int, K: int) -> dict:
    med = {k: statistics.median(v) for k, v in res.items()
           if isinstance(v, list) and v and k not in ("fork_pos", "seg_same_tree", "tree_same")}
    same = res["seg_same_tree"]
    info = {"token_ratio": res["tree_tokens"] / res["flat_tokens"],
            "time_ratio": med["tree"] / med["flat"],
            "token_ratio_segment": res["seg_tokens"] / res["flat_tokens"],
            "time_ratio_segment": med["seg"] / med["flat"],
            "time_ratio_segment_pipelined": med["seg_pipe"] / med["flat"],
            "pipelined_over_two_round": med["seg_pipe"] / med["seg"],
            "segment_fallback_forks": res["seg_fallback"],
            "segment_same_tree": f"{sum(same)}/{len(same)}",
            "time_ratio_pipelined": med["tree_pipe"] / med["flat"],
            "entropy_pipelined_over_two_round": med["tree_pipe"] / med["tree"],
            "time_ratio_pipelined_late": med["tree_pipe_late"] / med["flat"],
            "entropy_same_tree": f"{sum(res['tree_same'])}/{len(res['tree_same'])}",
            "spec_spawned_rows_per_root": res["spec"]["spawned_rows"] / res["spec"]["trees"],
            "spec_dropped_rows_per_root": res["spec"]["dropped_rows"] / res["spec"]["trees"],
            "spec_wasted_token_share": res["spec"]["dropped_tokens"] / res["tree_pipe_tokens"],
            "spec_late_spawns": res["spec"]["late_spawns"],
            "time_ratio_generate_decoder": med["tree_gen"] / med["flat_gen"],
            "loop_speedup_flat": med["flat_gen"] / med["flat"],
            "prefill_share": med["prefill"] / med["round2"],
            "fork_pos_mean": statistics.mean(res["fork_pos"]),
            "flat_tokens_per_row": res["flat_tokens"] / (rounds * K * 8),
            "threads": torch.get_num_threads(), "rounds": rounds}
    if "generate" in med:
        info["time_ratio_vs_generate"] = med["tree"] / med["generate"]
    return info


def _show(name, info):
    print(f"\n{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


@pytest.mark.parametrize("num_ops", [10, 30], ids=["walk13", "walk33"])
def test_tree_vs_flat_rollout(benchmark, num_ops):
    quick = bool(getattr(benchmark, "disabled", False))
    torch.set_num_threads(1)
    model, tok, task, pos = _policy(num_ops, sft_steps=20 if quick else 150)
    rounds = 1 if quick else 12
    prompts = [[tok(task.problem("train", pos + r * K + k).prompt)["input_ids"] for k in range(K)]
               for r in range(rounds)]

    def run():
        return _measure(model, prompts, task.completion_length + 2, rounds, tokenizer=tok,
                        seg_len=task.completion_length // 2)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    info = _ratios(res, rounds, K)
    info["sft_steps"] = 20 if quick else 150
    info["segment_len"] = task.completion_length // 2
    benchmark.group = "tree rollout vs flat group (8 leaves, tiny Qwen2, CPU, 1 thread)"
    benchmark.extra_info.update(info)
    _show(f"num_ops={num_ops}", info)
    assert res["tree_tokens"] > 0 and res["flat_tokens"] > 0


REAL = os.environ.get("CREDITLIB_BENCH_TREE_REAL", "") not in ("", "0", "false", "no")


@pytest.mark.skipif(not REAL, reason="real-size model (SmolLM2-135M shape): set CREDITLIB_BENCH_TREE_REAL=1")
def test_tree_vs_flat_rollout_real_size(benchmark):
    """The same comparison with a model of real size: a ``LlamaForCausalLM`` of SmolLM2-135M's
    shape (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152), random
    weights (no download), 2 prompts of 16 random tokens, cap 32 new tokens; a random policy never
    ends early, so every row runs to its cap; the segment tree forks at 16. Threads: torch's default
    on the machine (``CREDITLIB_BENCH_TREE_THREADS`` sets them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    if os.environ.get("CREDITLIB_BENCH_TREE_THREADS"):
        torch.set_num_threads(int(os.environ["CREDITLIB_BENCH_TREE_THREADS"]))
    rounds, Kr = int(os.environ.get("CREDITLIB_BENCH_TREE_ROUNDS", "4")), 2
    g = torch.Generator().manual_seed(1)
    prompts = [[torch.randint(3, 49152, (16,), generator=g).tolist() for _ in range(Kr)] for _ in range(rounds)]

    def run():
        return _measure(model, prompts, 32, rounds, pad_id=0, eos_ids=[2], seg_len=16)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    info = _ratios(res, rounds, Kr)
    info["segment_len"] = 16
    benchmark.group = "tree rollout vs flat group (8 leaves, SmolLM2-135M shape, CPU)"
    benchmark.extra_info.update(info)
    _show("SmolLM2-135M shape", info)
    assert res["tree_tokens"] > 0 and res["flat_tokens"] > 0
