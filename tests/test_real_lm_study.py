"""benchmarks/study/real_lm.py: the GRPO / GRPO-lambda / tree-prefix-gae comparison on a real-text task.

Fast checks of the arm table (parsed by the recipe's own config parser), the disjoint data sets and
``--plan``; one end-to-end run (three recipe subprocesses, 1 RL step each) on a tiny Qwen2 built
from a config by the script's ``--init-from-config tiny`` with a byte-level BPE tokenizer trained
here (no download).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("real_lm_study", ROOT / "benchmarks" / "study" / "real_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


real_lm = _load()


@pytest.mark.parametrize("group_size", [4, 8])
def test_arm_flags_parse_with_the_recipe_parser(tmp_path, group_size):
    from creditlib.rl.config import parse_args, tree_spec

    sys.path.insert(0, str(ROOT / "recipes"))
    import grpo  # noqa: E402  (recipes/grpo.py: its own defaults)

    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    real_lm.write_rows(train, real_lm.arithmetic_rows(8, 0))
    real_lm.write_rows(held, real_lm.arithmetic_rows(4, 1))
    a = real_lm.resolve(real_lm.build_parser().parse_args(["--group-size", str(group_size), "--model", "some/model"]))
    credits = {}
    for arm in real_lm.ARMS:
        argv = real_lm.common_flags(a, train, held) + real_lm.arm_flags(arm, group_size) + ["--output-dir",
                                                                                             str(tmp_path / arm)]
        cfg = parse_args(argv, defaults=grpo.DEFAULTS)  # validates every option (tree shape vs group size incl.)
        assert cfg.sft_steps == 0 and cfg.chat_template == "on" and cfg.eval_dataset == str(held)
        assert cfg.group_size == group_size and cfg.max_steps == a.steps and cfg.lr == a.lr
        credits[arm] = cfg.credit
        if arm == "tree-prefix-gae":
            assert tree_spec(cfg).leaves == group_size and cfg.tree_roots == group_size // 4
        else:
            assert cfg.tree_roots == 0
    assert credits == {"grpo": "grpo", "grpo-lambda": "grpo-lambda", "tree-prefix-gae": "prefix-gae"}


def test_tree_arm_refuses_a_group_its_leaves_cannot_fill():
    with pytest.raises(ValueError, match="group_size must be a multiple of 4"):
        real_lm.arm_flags("tree-prefix-gae", 6)
    with pytest.raises(SystemExit):  # argparse error naming the problem
        real_lm.main(["--plan", "--group-size", "6"])


@pytest.mark.parametrize("ops,max_operand", [("+-", 20), ("+-*", 99)])
def test_train_and_heldout_sets_are_disjoint(ops, max_operand):
    train, held = real_lm.make_sets(256, 32, ops=ops, max_operand=max_operand)
    assert len(train) == 256 and len(held) == 32
    q_train, q_held = {r["question"] for r in train}, [r["question"] for r in held]
    assert not q_train & set(q_held) and len(set(q_held)) == 32
    with pytest.raises(ValueError, match="share 1 question"):
        real_lm.check_disjoint(train, train[:1])
    with pytest.raises(ValueError, match="seeds? must differ|must differ"):
        real_lm.make_sets(8, 4, train_seed=3, heldout_seed=3)


def test_plan_prints_sizes_and_launches_nothing(tmp_path, capsys):
    out = tmp_path / "plan"
    assert real_lm.main(["--plan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "estimated wall time" in text and "--tree-roots 1" in text and "--credit grpo-lambda" in text
    assert not out.exists()  # nothing written, nothing run
    assert real_lm.main(["--plan", "--preset", "gpu", "--model", "m", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--device cuda" in text and "--max-new-tokens 256" in text and "--tree-roots 2" in text


def _tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer with a ChatML template, trained on arithmetic text (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["answer"] for r in real_lm.arithmetic_rows(50, 9)] + ["Answer with a number."]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)
    return path


@pytest.mark.slow  # three recipe subprocesses
def test_end_to_end_three_arms_on_a_tiny_random_qwen2(tmp_path, capsys):
    model = tmp_path / "tiny-qwen2"
    assert real_lm.main(["--init-from-config", "tiny", "--model", str(model),
                         "--tokenizer", str(_tokenizer(tmp_path / "tok"))]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2
    with pytest.raises(SystemExit):  # never writes over a folder
        real_lm.main(["--init-from-config", "tiny", "--model", str(model), "--tokenizer", str(tmp_path / "tok")])

    out = tmp_path / "study"
    argv = ["--model", str(model), "--out", str(out), "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--heldout", "4", "--eval-samples", "1", "--train-size", "16", "--num-threads", "1"]
    assert real_lm.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == set(real_lm.ARMS) and summary["random_weights"] is True
    for arm, r in summary["arms"].items():
        assert r["rl_steps"] == 1 and r["generated_tokens"] > 0, arm
        for k in ("greedy_before", "greedy_after", "sampled_before", "sampled_after", "generated_tokens",
                  "train_reward_mean", "seconds_per_step", "wall_seconds"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (arm, k)
            assert r[k] >= 0
    md = (out / "results.md").read_text()
    assert md.startswith("# Smoke-scale check, not a result") and "| tree-prefix-gae |" in md
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert not {r["question"] for r in train} & {r["question"] for r in held}

    # resumable: a second call skips every finished arm and rewrites the same table
    capsys.readouterr()
    assert real_lm.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 3
    # a finished run made with other flags is refused, not deleted
    with pytest.raises(SystemExit, match="other flags"):
        real_lm.main(argv[:-2] + ["--lr", "0.5"])
    assert (out / "grpo" / "final").is_dir()
