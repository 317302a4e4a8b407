"""The tasks / datasets registry: one call registers a task; the prompt source, the reward, the
config's validation and ``--help`` all read it; a ``--dataset`` typo gets a "did you mean"."""

import json

import pytest

from creditlib.rl import registry as R
from creditlib.rl.config import build_parser, load_config, parse_args
from creditlib.rl.data import MathSource, SyntheticSource, build_source
from creditlib.rl.rewards import SafeReward, reward_for_dataset
from creditlib.rl.task import ChainTask, build_char_tokenizer, chain_reward


class _EvenTask(ChainTask):
    """A dial walk whose answer is whether the end position is even ("e") or odd ("o")."""

    def problem(self, split, index):
        p = super().problem(split, index)
        ans = "e" if int(p.answer) % 2 == 0 else "o"
        return type(p)(p.prompt, ans, ans)


def _parity_reward(completions, answers):
    return [1.0 if c.strip()[:1] == a else 0.0 for c, a in zip(completions, answers)]


@pytest.fixture()
def parity():
    spec = R.register_dataset("parity-test", lambda cfg, tok: SyntheticSource(
        _EvenTask(cfg.num_ops, cfg.data_seed, {"test": cfg.eval_size, "val": 16}), tok),
        reward=_parity_reward, description="parity of a dial walk (test task)", embedded=True)
    yield spec
    R._REGISTRY.pop("parity-test", None)


def test_one_call_registers_a_task_everywhere(parity, capsys):
    assert "parity-test" in R.list_datasets() and R.get_dataset("parity-test") is parity
    cfg = load_config(overrides={"dataset": "parity-test", "num_ops": 4, "eval_size": 8})
    src = build_source(cfg, build_char_tokenizer())
    assert isinstance(src.task, _EvenTask) and {e.answer for e in src.heldout(8)} <= {"e", "o"}
    assert reward_for_dataset("parity-test") is _parity_reward
    r, _ = SafeReward(reward_for_dataset("parity-test"))(["e", "o9"], ["e", "e"])
    assert r.tolist() == [1.0, 0.0]
    # --help shows it with its description
    text = " ".join(build_parser().format_help().split())
    assert "'parity-test' (parity of a dial walk (test task))" in text and "'gsm8k' (GSM8K from the Hub" in text
    # an embedded task refuses --model
    with pytest.raises(ValueError, match="own tokenizer"):
        load_config(overrides={"dataset": "parity-test", "model": "Qwen/Qwen2.5-0.5B"})


def test_builtins_and_local_files(tmp_path):
    assert R.list_datasets()[:3] == ["synthetic", "gsm8k", "math"]
    assert reward_for_dataset("synthetic")(["12=3"], ["3"]) == chain_reward(["12=3"], ["3"]) == [1.0]
    assert getattr(reward_for_dataset("gsm8k"), "bounded_time", False)  # math-verify times itself
    src = build_source(load_config(overrides={"eval_size": 8}), build_char_tokenizer())
    assert isinstance(src, SyntheticSource) and type(src.task) is ChainTask
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}"})
                           for i in range(20)))
    spec = R.get_dataset(str(f))
    assert spec.name == str(f) and not spec.embedded
    src = build_source(load_config(overrides={"dataset": str(f), "eval_size": 4}), build_char_tokenizer())
    assert isinstance(src, MathSource) and len(src.train_rows) + len(src.held_rows) == 20
    assert reward_for_dataset(str(f))(["\\boxed{3}"], ["3"]) == [1.0]


@pytest.mark.parametrize("typo, suggestion", [("gsm8kk", "gsm8k"), ("synthetc", "synthetic"), ("maths", "math"),
                                              ("Synthetik", "synthetic")])
def test_dataset_typo_did_you_mean(typo, suggestion, capsys):
    with pytest.raises(ValueError, match=f"unknown dataset '{typo}' \\(did you mean '{suggestion}'"):
        R.get_dataset(typo)
    with pytest.raises(SystemExit):
        parse_args(["--dataset", typo])
    err = capsys.readouterr().err
    assert f"did you mean '{suggestion}'" in err and "--dataset" in err


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="no-such.jsonl.*does not exist"):
        R.get_dataset(str(tmp_path / "no-such.jsonl"))
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must end in"):
        R.get_dataset(str(tmp_path / "rows.csv"))
    with pytest.raises(ValueError, match="unknown dataset 'zzzz'"):
        R.get_dataset("zzzz")
    with pytest.raises(ValueError, match="already registered"):
        R.register_dataset("gsm8k", lambda c, t: None, reward=_parity_reward, description="x")
    for bad in ("", "  ", "a b", "a/b", "rows.jsonl", "Rows.JSONL"):
        with pytest.raises(ValueError, match="name"):
            R.register_dataset(bad, lambda c, t: None, reward=_parity_reward, description="x")
    with pytest.raises(ValueError, match="builder"):
        R.register_dataset("ok-name", None, reward=_parity_reward, description="x")
    with pytest.raises(ValueError, match="reward"):
        R.register_dataset("ok-name", lambda c, t: None, reward=3, description="x")
    with pytest.raises(ValueError, match="description"):
        R.register_dataset("ok-name", lambda c, t: None, reward=_parity_reward, description=" ")
    assert "ok-name" not in R.list_datasets()


def test_names_are_normalised_on_registration_and_duplicates_refused():
    spec = R.register_dataset(" My_Parity ", lambda c, t: None, reward=_parity_reward, description="x")
    try:
        assert spec.name == "my-parity" and "my-parity" in R.list_datasets()
        for alias in ("my-parity", "My_Parity", " MY-PARITY", "my_parity"):
            assert R.get_dataset(alias) is spec
        for dup in ("my-parity", "MY_PARITY", " my_parity"):
            with pytest.raises(ValueError, match="'my-parity' is already registered"):
                R.register_dataset(dup, lambda c, t: None, reward=_parity_reward, description="y")
        assert R.get_dataset("Synthetic") is R.get_dataset("synthetic")  # lookups normalise too
        with pytest.raises(ValueError, match="'gsm8k' is already registered"):
            R.register_dataset(" GSM8K", lambda c, t: None, reward=_parity_reward, description="y")
        again = R.register_dataset("MY_PARITY", lambda c, t: 1, reward=_parity_reward, description="z",
                                   overwrite=True)
        assert R.get_dataset("my-parity") is again and R.list_datasets().count("my-parity") == 1
    finally:
        R._REGISTRY.pop("my-parity", None)


def test_no_import_cycle_between_data_and_registry():
    """Neither module imports the other at module level (the registry's builders and
    data.build_source import at call time)."""
    import ast
    from pathlib import Path

    root = Path(R.__file__).parent
    for here, other in (("data.py", "registry"), ("registry.py", "data")):
        tree = ast.parse((root / here).read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[-1] != other, f"{here} imports {other} at module level"
    from creditlib.rl import data

    assert data.build_source(load_config(overrides={"eval_size": 4}), build_char_tokenizer()).heldout(2)


def test_eval_dataset_typo_did_you_mean(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"{i}?", "answer": str(i)}) for i in range(8)))
    cfg = load_config(overrides={"dataset": str(f), "eval_dataset": "gsm8kk"})
    with pytest.raises(ValueError, match=r"--eval-dataset 'gsm8kk'.*did you mean 'gsm8k'"):
        build_source(cfg, build_char_tokenizer())
