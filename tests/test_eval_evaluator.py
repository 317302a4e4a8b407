"""Evaluator end to end: oracle generator (scores reach 1.0), a tiny random Qwen2 through the
HF generator (pipeline, cache resume, table and JSON), rewards, and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from creditlib.eval import (
    EvalResult,
    GenerationCache,
    HFGenerator,
    OracleGenerator,
    VLLMGenerator,
    accuracy_reward,
    evaluate,
    format_reward,
    load_benchmark,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "math")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model_and_tokenizer():
    """A randomly initialised 2-layer Qwen2 and a byte-level BPE tokenizer trained on the
    fixture problems (offline, ~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    texts = []
    for name in ("gsm8k", "amc23"):
        with open(os.path.join(FIXTURES, name, "test.jsonl"), encoding="utf-8") as f:
            texts += [line for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    cfg = Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), hf_tok


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def test_oracle_reaches_one_on_every_benchmark():
    names = ["gsm8k", "math500", "aime24", "amc23", "minerva_math", "olympiadbench"]
    data = {n: load_benchmark(n, path=FIXTURES).to_list()[:12] for n in names}
    res = evaluate(OracleGenerator.from_datasets(data), names, n_samples=2, datasets=data, progress=False)
    for n in names:
        assert res.metrics[n]["pass@1"] == 1.0 and res.metrics[n]["pass@2"] == 1.0, n
    assert res.average["pass@1"] == 1.0
    # an oracle for other problems answers nothing here: every score is 0
    other = OracleGenerator({"a problem that is not in any benchmark": "\\boxed{1}"})
    res0 = evaluate(other, ["amc23"], datasets=data, progress=False)
    assert res0.metrics["amc23"]["pass@1"] == 0.0


class CountingGenerator:
    """Wraps a real generator; counts prompts and can stop the run after some calls (an
    interruption such as a crash or Ctrl-C)."""

    def __init__(self, inner, stop_after=None):
        self.inner, self.stop_after, self.calls, self.prompts = inner, stop_after, 0, 0

    def generate(self, prompts, n):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.generate(prompts, n)


def test_tiny_qwen_pipeline_cache_resume_table_json(tiny, tmp_path):
    model, tok = tiny
    gen = HFGenerator(model, tok, temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=2)
    out = gen.generate(["What is 1+1?", "Compute 2+3."], 3)
    assert len(out) == 2 and all(len(o) == 3 and all(isinstance(t, str) for t in o) for o in out)
    greedy = HFGenerator(model, tok, temperature=0.0, max_new_tokens=4)
    g = greedy.generate(["What is 1+1?"], 2)
    assert g[0][0] == g[0][1]

    cache = tmp_path / "gens.jsonl"
    settings = {"model": "tiny-qwen2", "temperature": 1.0}
    kw = dict(n_samples=2, data_dir=FIXTURES, limit=3, cache_path=cache, settings=settings, chunk_size=2,
              progress=False)
    first = CountingGenerator(gen, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, ["gsm8k", "amc23"], **kw)
    lines = cache.read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # two chunks of two prompts, two samples each, were saved
    second = CountingGenerator(gen)
    res = evaluate(second, ["gsm8k", "amc23"], **kw)
    assert second.prompts == 6 - 4  # only the problems missing from the cache were generated
    assert len(cache.read_text().splitlines()) == 6 * 2
    third = CountingGenerator(gen)
    res_again = evaluate(third, ["gsm8k", "amc23"], **kw)
    assert third.calls == 0 and res_again.metrics == res.metrics
    # other settings never reuse these generations
    fourth = CountingGenerator(gen)
    evaluate(fourth, ["amc23"], **{**kw, "settings": {"model": "another"}, "limit": 1})
    assert fourth.prompts == 1 and GenerationCache(cache, {"model": "another"}).ignored > 0

    for b in ("gsm8k", "amc23"):
        m = res.metrics[b]
        assert m["n_problems"] == 3 and m["n_samples"] == 2
        assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0
    table = res.table()
    assert table.splitlines()[0] == "| score | GSM8K | AMC23 | Average |"
    assert any(line.startswith("| pass@1 |") for line in table.splitlines())
    assert "Average" in res.table("plain")
    res.save(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["benchmarks"]["amc23"]["n_problems"] == 3 and "pass@2" in saved["average"]
    assert len(saved["correct_per_problem"]["gsm8k"]) == 3


def test_evaluate_arguments():
    gen = OracleGenerator({"x": "\\boxed{1}"})
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(gen, ["amc23"], n_samples=0, data_dir=FIXTURES)
    with pytest.raises(ValueError, match="benchmarks"):
        evaluate(gen, "amc23", data_dir=FIXTURES)
    with pytest.raises(ValueError, match="benchmarks must be among"):
        evaluate(gen, ["amc24"], data_dir=FIXTURES)
    with pytest.raises(ValueError, match="n must be"):
        gen.generate(["x"], 0)
    with pytest.raises(ValueError, match="temperature"):
        HFGenerator(object(), object(), temperature=-1)


def test_vllm_generator_reports_missing_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="vLLM|vllm"):
            VLLMGenerator("some/model")
    else:  # pragma: no cover - machines with vLLM
        pytest.skip("vLLM is installed here")


def test_rewards():
    comps = ["... \\boxed{3}", "no answer, 3", "\\boxed{4}", None, "\\boxed{" + "{" * 5000, 7,
             [{"role": "assistant", "content": "so \\boxed{\\frac{6}{2}}"}]]
    golds = ["3"] * len(comps)
    r = accuracy_reward(comps, golds)
    assert r == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert accuracy_reward(comps[:2], answer=golds[:2], last_number_fallback=True) == [1.0, 1.0]
    f = format_reward(comps)
    assert f == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(["<think>hm</think> \\boxed{1}", "\\boxed{1} <think>x</think>"], require_think=True) == [1.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        accuracy_reward(["a"], ["1", "2"])
    with pytest.raises(ValueError, match="answers"):
        accuracy_reward(["a"])


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_math_recipe", os.path.join(ROOT, "recipes", "eval_math.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_help_oracle_and_tiny_model(tiny, tmp_path, capsys):
    script = os.path.join(ROOT, "recipes", "eval_math.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    help_out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, check=True)
    for opt in ("--model", "--benchmarks", "--n-samples", "--rollout", "--cache", "--self-check", "--output",
                "--temperature", "--max-new-tokens", "--data-dir", "--limit", "--k"):
        assert opt in help_out.stdout
    main = _recipe().main
    model, tok = tiny
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out_json = tmp_path / "res.json"
    argv = ["--model", str(tmp_path / "tiny"), "--benchmarks", "amc23,gsm8k", "--data-dir", FIXTURES, "--limit", "2",
            "--n-samples", "2", "--max-new-tokens", "4", "--dtype", "float32", "--output", str(out_json),
            "--no-progress"]
    assert main(argv) == 0
    assert "| score | AMC23 | GSM8K | Average |" in capsys.readouterr().out
    cache = tmp_path / "res.generations.jsonl"
    assert len(cache.read_text().splitlines()) == 2 * 2 * 2
    saved = json.loads(out_json.read_text())
    assert saved["settings"]["model"] == str(tmp_path / "tiny") and "pass@2" in saved["average"]
    assert main(argv) == 0  # everything comes from the cache
    assert len(cache.read_text().splitlines()) == 8
    assert json.loads(out_json.read_text())["benchmarks"] == saved["benchmarks"]
    assert main(["--oracle", "--benchmarks", "math500,aime24", "--data-dir", FIXTURES, "--limit", "5", "--no-cache",
                 "--output", str(tmp_path / "o.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["average"]["pass@1"] == 1.0
    capsys.readouterr()
    assert main(["--model", "x", "--benchmarks", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["--model", "x", "--benchmarks", "math50"]) == 2
    assert "did you mean 'math500'" in capsys.readouterr().err
    # offline without local data: the error names the flags that load local files
    import datasets

    def offline(*a, **k):
        raise ConnectionError("the Hub is unreachable")

    real = datasets.load_dataset
    datasets.load_dataset = offline
    try:
        assert main(["--oracle", "--benchmarks", "amc23", "--no-cache", "--no-progress"]) == 2
    finally:
        datasets.load_dataset = real
    err = capsys.readouterr().err
    assert "--data-dir DIR" in err and "--data NAME=FILE" in err
    assert main(["--benchmarks", "amc23", "--data-dir", FIXTURES]) == 2  # neither --model nor --oracle
