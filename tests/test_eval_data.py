"""Benchmark loaders on the attributed fixtures (publishers' formats), local paths and errors."""

import json
import os

import datasets
import pytest

from creditlib.eval import BENCHMARKS, load_benchmark

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "math")


def _raw(name):
    with open(os.path.join(FIXTURES, name, "test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_load_fixture(name):
    ds = load_benchmark(name, path=os.path.join(FIXTURES, name, "test.jsonl"))
    raw = _raw(name)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names[:2] == ["problem", "answer"]
    assert len(ds) == len(raw)
    for row, src in zip(ds, raw):
        assert isinstance(row["problem"], str) and row["problem"].strip()
        assert isinstance(row["answer"], str) and row["answer"].strip()
        assert "$" not in row["answer"].replace("\\$", "")


def test_answer_fields_per_publisher():
    gsm = load_benchmark("gsm8k", path=FIXTURES)  # a folder with <name>/test.jsonl works too
    raw = _raw("gsm8k")
    assert gsm[0]["answer"] == raw[0]["answer"].split("####")[-1].strip().replace(",", "")
    assert gsm[0]["solution"] == raw[0]["answer"] and gsm[0]["question"] == raw[0]["question"]
    amc = load_benchmark("amc23", path=FIXTURES)
    assert amc[0]["answer"] == "27" and amc[0]["url"].startswith("https://")
    aime = load_benchmark("aime24", path=FIXTURES)
    assert aime[0]["answer"] == "204" and aime.num_rows == 30
    minerva = load_benchmark("minerva_math", path=FIXTURES)
    assert minerva[0]["answer"] == "1.6"  # the last \boxed{} of the solution
    olym = load_benchmark("olympiadbench", path=FIXTURES)
    src = _raw("olympiadbench")
    assert olym[0]["final_answer"] == src[0]["final_answer"]
    multi = [r for r in olym if r["is_multiple_answer"]]
    assert multi and all("$" not in r["answer"] for r in multi)
    m500 = load_benchmark("math500", path=FIXTURES)
    assert "\\$32,\\!348" in list(m500["answer"])  # an escaped dollar (currency) is kept


def test_parquet_and_json_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _raw("math500")[:5]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    ds = load_benchmark("math500", path=tmp_path / "m.parquet")
    assert list(ds["answer"]) == [r["answer"] for r in rows]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    assert list(load_benchmark("math500", path=str(tmp_path / "m.json"))["answer"]) == list(ds["answer"])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="gsm8k.*math500|name must be one of"):
        load_benchmark("math")
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark("math500", path=tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="jsonl"):
        load_benchmark("math500", path=tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"problem": "p"}\n')
    with pytest.raises(ValueError, match="no gold answer"):
        load_benchmark("math500", path=tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="folder without"):
        load_benchmark("math500", path=tmp_path)


def test_hub_failure_message_says_how_to_load_offline():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest: the hub is unreachable
    with pytest.raises(RuntimeError) as err:
        load_benchmark("math500")
    msg = str(err.value)
    assert "HuggingFaceH4/MATH-500" in msg and "path=" in msg
