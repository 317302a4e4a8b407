"""Tree rollouts in the recipe (issue 19, item 2): ``recipes/grpo.py --tree-roots M ...``.

* real recipe steps with a tree for a group method (``grpo``) and a prefix-tree method
  (``prefix-gae``): the tree's rows, token counts and shape in ``metrics.jsonl``, accuracy against
  generated tokens in the evaluations, the summary and the two-panel plot;
* one recipe rollout checked row by row: rows of one prompt contiguous (so ``group_size`` stays the
  group), each child's shared prefix equal to its parent's tokens, the token counts; flat rollouts
  log their generated tokens too;
* ``--resume`` of a tree run draws the same trees (the tree's seed is a function of the step);
* bad options: a shape whose leaves differ from ``--group-size``, ``--top-p < 1``, ``--rollout vllm``,
  a ``--tree-*`` option without ``--tree-roots``, bad counts and ``--tree-select``.
Tiny sizes: a 1-layer model, 6-move walks, 4 prompts x 4 leaves, 2 RL steps.
"""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("torchrl.objectives.llm.grpo")

from creditlib.rl.config import load_config, tree_spec  # noqa: E402
from creditlib.rl.metrics import read_metrics  # noqa: E402
from creditlib.rl.tree import TreeRollout  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_tree_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


grpo = _load("grpo")

TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--num-ops", "6", "--eval-size", "16", "--sft-steps", "4", "--sft-eval-every", "2", "--sft-batch-size", "16",
        "--sft-target-accuracy", "0", "--prompts-per-step", "4", "--group-size", "4", "--no-progress",
        "--num-threads", "1", "--no-plot", "--eval-every", "1"]
TREE = ["--tree-roots", "1", "--tree-forks", "1", "--tree-branches", "3", "--tree-depth", "1"]  # 1 * (1 + 3) = 4 leaves
TREE_FIELDS = ("rows", "generated_tokens", "row_tokens", "generated_tokens_total", "token_ratio", "fork_pos_mean",
               "fallback_relaxed_gap", "fallback_at_own_fork")


def _phase(path, phase):
    return [r for r in read_metrics(path) if r["phase"] == phase]


@pytest.mark.parametrize("credit", ["grpo", "prefix-gae"])
def test_two_recipe_steps_with_a_tree(credit, tmp_path, capsys):
    out = tmp_path / credit
    s = grpo.main(TINY + TREE + ["--credit", credit, "--max-steps", "2", "--output-dir", str(out), "--plot"])
    text = capsys.readouterr().out
    assert "rollout: a tree of 4 leaves per prompt: 1 root(s), 1 round(s) of 1 fork(s) x 3 branch(es)" in text
    rl = _phase(out / "metrics.jsonl", "rl")
    assert [r["step"] for r in rl] == [1, 2]
    total = 0.0
    for r in rl:
        assert all(k in r for k in TREE_FIELDS), sorted(r)
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["rows"] == 4 * 4 and r["num_tokens"] == r["row_tokens"]  # the update trains on every row token
        assert 4 * 4 <= r["generated_tokens"] <= r["row_tokens"]  # shared prefix tokens are generated once
        assert r["token_ratio"] == pytest.approx(r["generated_tokens"] / r["row_tokens"])
        assert r["fallback_relaxed_gap"] >= 0 and r["fallback_at_own_fork"] >= 0
        assert r["fallback_relaxed_gap"] + r["fallback_at_own_fork"] <= 4  # one fork per root, 4 roots
        assert r["fork_pos_mean"] >= 0
        total += r["generated_tokens"]
        assert r["generated_tokens_total"] == total
    ev = _phase(out / "metrics.jsonl", "eval")
    assert [(e["step"], e["generated_tokens"]) for e in ev] == [(0, 0.0), (1, rl[0]["generated_tokens_total"]),
                                                               (2, total)]
    assert s["generated_tokens"] == total and s["tree"] == 4 and s["credit"] == credit
    assert f"{total:,.0f}" in text and "generated tokens (RL rollouts)" in text
    assert (out / "metrics.png").stat().st_size > 1000


def _setup(tmp_path, name, extra):
    cfg = load_config(overrides=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, num_ops=6,
                                     eval_size=8, sft_steps=0, prompts_per_step=4, group_size=4, progress=False,
                                     num_threads=1, output_dir=str(tmp_path / name), **extra), defaults=grpo.DEFAULTS)
    return grpo.setup(cfg)


def test_a_recipe_tree_rollout_row_by_row(tmp_path):
    r = _setup(tmp_path, "tree", dict(tree_roots=1, tree_branches=3, credit="prefix-gae"))
    assert r.tree == tree_spec(r.cfg) and r.tree.leaves == r.cfg.group_size == 4
    K, G = 4, 4
    prompts, _ = r.source.next_batch(0, K)
    ids, mask = r.source.encode(prompts, r.device)  # [K, P]
    batch, shape = grpo.sample_rollout(r, prompts, ids, mask, step=1)
    assert isinstance(batch, TreeRollout) and batch.batch_size == K * G
    assert torch.equal(batch.group_ids, torch.arange(K).repeat_interleave(G))  # rows of one prompt contiguous
    for i in range(K * G):  # every row carries its own prompt
        k = i // G
        got = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        assert torch.equal(got, ids[k][mask[k].bool()]), i
        p, f = int(batch.parent[i]), int(batch.fork_pos[i])
        if p >= 0:  # a child: its first fork_pos tokens are its parent's
            assert p // G == k and torch.equal(batch.completion_ids[i, :f], batch.completion_ids[p, :f])
            assert batch.completion_mask[p, :f].all()
    n = batch.completion_mask.sum(1)  # [B]
    assert shape["rows"] == K * G and shape["row_tokens"] == float(n.sum())
    assert shape["generated_tokens"] == float((n - batch.fork_pos).sum())
    # the texts the reward reads are the rows' tokens
    assert batch.texts == r.tokenizer.batch_decode(batch.completion_ids.masked_fill(~batch.completion_mask,
                                                                                    r.tokenizer.pad_token_id),
                                                   skip_special_tokens=True)
    # the tree of a step is a function of (seed, step, rank): a resumed run draws the same one
    again, _ = grpo.sample_rollout(r, prompts, ids, mask, step=1)
    assert torch.equal(again.completion_ids, batch.completion_ids) and torch.equal(again.parent, batch.parent)
    assert grpo.tree_seed(0, 1, 0) != grpo.tree_seed(0, 2, 0) != grpo.tree_seed(1, 2, 0)
    # flat rollouts count their generated tokens too (every row token is generated)
    flat = _setup(tmp_path, "flat", dict(credit="prefix-gae"))
    assert flat.tree is None
    fb, fshape = grpo.sample_rollout(flat, prompts, ids, mask, step=1)
    assert fb.batch_size == K * G
    assert fshape == {"rows": K * G, "generated_tokens": float(fb.completion_mask.sum()),
                      "row_tokens": float(fb.completion_mask.sum())}


def test_resume_of_a_tree_run_matches_the_uninterrupted_run(tmp_path):
    args = TINY + TREE + ["--credit", "prefix-gae", "--max-steps", "3", "--save-every", "1"]
    grpo.main(args + ["--output-dir", str(tmp_path / "ref")])
    run = tmp_path / "split"
    grpo.main(args + ["--output-dir", str(run), "--max-steps", "2"])
    grpo.main(args + ["--output-dir", str(run), "--resume"])
    keys = ("reward", "loss", "generated_tokens", "generated_tokens_total", "row_tokens", "fork_pos_mean")
    a, b = _phase(tmp_path / "ref" / "metrics.jsonl", "rl"), _phase(run / "metrics.jsonl", "rl")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


@pytest.mark.parametrize("argv, says", [
    (["--tree-roots", "2", "--tree-branches", "3"], "group_size=4 but TreeSpec"),  # 8 leaves for a group of 4
    (TREE + ["--top-p", "0.9"], "--top-p 1"),
    (TREE + ["--rollout", "vllm", "--model", "some/model", "--dataset", "gsm8k"], "transformers only"),
    (["--tree-branches", "2"], "add --tree-roots"),
    (["--tree-roots", "-1"], "tree_roots must be an integer >= 0"),
    (["--tree-roots", "1", "--tree-forks", "0"], "--tree-forks: forks must be a positive int"),
    (TREE + ["--tree-select", "segment", "--tree-min-gap", "3", "--tree-segment-len", "2"],
     "--tree-segment-len: segment_len (2) must be >= min_gap (3)"),
    (TREE + ["--tree-select", "middle"], "invalid choice: 'middle'"),
])
def test_bad_tree_options_are_refused(argv, says, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        grpo.main(TINY + ["--max-steps", "1", "--output-dir", str(out)] + argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_the_tree_config_file():
    cfg = load_config(str(ROOT / "recipes" / "configs" / "tree_prefix_gae.yaml"), defaults=grpo.DEFAULTS)
    spec = tree_spec(cfg)
    assert (cfg.credit, spec.roots, spec.forks, spec.branches, spec.depth, spec.select) == \
        ("prefix-gae", 2, 1, 3, 1, "entropy")
    assert spec.leaves == cfg.group_size == 8
    assert tree_spec(load_config(str(ROOT / "recipes" / "configs" / "grpo_lambda.yaml"))) is None  # off by default
    with pytest.raises(ValueError, match="group_size=4"):  # nothing changes the group size silently
        load_config(str(ROOT / "recipes" / "configs" / "tree_prefix_gae.yaml"), overrides={"group_size": 4})
