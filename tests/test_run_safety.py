"""Nothing lost on a re-run, clear errors, the start-up and summary lines (issue 18, recipe side).

Each test here failed on the main before it: every run wrote ``runs/grpo`` and a re-run truncated
``metrics.jsonl`` and deleted checkpoints; ``--init-from R --output-dir R`` deleted its own source;
``--resume --report-to tensorboard`` purged warm-up points and ``--report-to wandb`` started a new
W&B run; ``--resume --kl-coef`` without a reference and ``--init-from`` of another model size gave
raw tracebacks; a symlinked ``step_N`` let ``--resume`` load another run; the summary table was
170 columns wide and titled "GRPO summary" for every credit method; ``demo_credit.py`` wrote into
``docs/img`` when asked to. Tiny sizes: 1-layer model, no warm-up unless needed, 1-2 RL steps.
"""

import glob
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("torchrl.objectives.llm.grpo")

from creditlib.rl import checkpoint as ckpt  # noqa: E402
from creditlib.rl.config import load_config  # noqa: E402
from creditlib.rl.loop import RUN_ARTEFACTS, TINY_MODEL_PARAMS, choose_threads, run_folder  # noqa: E402
from creditlib.rl.metrics import read_metrics  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"run_safety_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


grpo = _load("grpo")
LAMBDA = ["--config", str(ROOT / "recipes" / "configs" / "grpo_lambda.yaml")]  # the grpo_lambda.py preset

TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--num-ops", "6", "--eval-size", "16", "--sft-steps", "0", "--prompts-per-step", "4", "--group-size", "4",
        "--no-progress", "--no-plot", "--max-steps", "1", "--eval-every", "1"]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (what a refused run must leave untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv, recipe=grpo):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        recipe.main(argv)
    assert e.value.code == 2
    return e.value, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. a folder per run
def test_every_run_gets_its_own_folder_and_the_summary_fits_100_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        a = grpo.main(TINY + ["--credit", "gspo"])  # no --num-threads: auto
        assert torch.get_num_threads() == 1  # a tiny model: one thread
    finally:
        torch.set_num_threads(threads)
    first = capsys.readouterr().out
    assert first.splitlines()[1].startswith("threads: 1 CPU thread") and "auto: a small model" in first
    before = _snapshot(Path(a["output_dir"]))
    b = grpo.main(LAMBDA + TINY)  # a preset follows the same rule
    second = capsys.readouterr().out
    for s, credit in ((a, "gspo"), (b, "grpo-lambda")):
        out = Path(s["output_dir"])
        assert out.parent == Path("runs")
        assert re.fullmatch(rf"{credit}-synthetic-\d{{8}}-\d{{6}}(-\d+)?", out.name), out.name
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "rl"] == [1]
    assert a["output_dir"] != b["output_dir"]
    assert _snapshot(Path(a["output_dir"])) == before  # the second run changed nothing of the first
    assert first.splitlines()[0] == f"GRPO: run folder {a['output_dir']}"  # said first
    # the summary: at most 100 columns, titled with the credit method
    for text, name, credit in ((first, "GRPO", "gspo"), (second, "GRPO", "grpo-lambda")):
        table = text[text.index("+---"):]
        assert max(len(line) for line in table.splitlines()) <= 100
        assert f"{name} summary: --credit {credit}" in table


def test_run_folder_names_do_not_collide_within_a_second(tmp_path):
    cfg = load_config(overrides={"credit": "prefix-gae", "dataset": "synthetic"})
    now = 1_800_000_000.0
    paths = [run_folder(cfg, root=tmp_path / "runs", now=now) for _ in range(3)]
    assert [created for _, created in paths] == [True] * 3
    names = [p.name for p, _ in paths]
    assert len(set(names)) == 3 and names[1] == names[0] + "-2" and names[2] == names[0] + "-3"
    assert all(p.is_dir() for p, _ in paths)
    data = tmp_path / "data" / "my set.jsonl"
    named = load_config(overrides={"output_dir": str(tmp_path / "x")})
    assert run_folder(named, root=tmp_path / "runs") == (tmp_path / "x", False)  # --output-dir as given
    from creditlib.rl.loop import _task_name

    assert _task_name(str(data)) == "my_set" and _task_name("gsm8k") == "gsm8k"


# ----------------------------------------------------------------------------- 1. --output-dir holding a run
def test_an_output_dir_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(TINY + ["--output-dir", str(out), "--max-steps", "2", "--save-every", "1"])
    (out / "notes.txt").write_text("mine")  # a file that is not the run's
    kept = _snapshot(out)
    for extra in ([], ["--credit", "gspo"], LAMBDA):
        e, err = _refused(capsys, TINY + ["--output-dir", str(out)] + extra)
        assert "holds another run" in err and "--resume" in err and "--overwrite" in err and "metrics.jsonl" in err
        assert _snapshot(out) == kept  # nothing deleted, nothing truncated
    with pytest.raises(SystemExit):  # the two exclude each other
        grpo.main(TINY + ["--output-dir", str(out), "--resume", "--overwrite"])
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --resume needs the folder to continue
        grpo.main(TINY + ["--resume"])
    assert "--resume needs --output-dir" in capsys.readouterr().err
    # --resume continues it
    grpo.main(TINY + ["--output-dir", str(out), "--resume", "--max-steps", "3"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "rl"] == [1, 2, 3]
    # --overwrite deletes exactly the run's files, then starts over; the other file stays
    capsys.readouterr()
    grpo.main(TINY + ["--output-dir", str(out), "--overwrite"])
    said = capsys.readouterr().out
    assert "--overwrite: deleted the previous run's" in said and "checkpoints" in said
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "rl"] == [1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000000", "step_000001"]
    assert (out / "notes.txt").read_text() == "mine"
    # a folder with only other files is not a run: a new run may use it
    other = tmp_path / "launcher"
    other.mkdir()
    (other / "run.log").write_text("launcher log\n")
    grpo.main(TINY + ["--output-dir", str(other)])
    assert (other / "run.log").read_text() == "launcher log\n" and (other / "metrics.jsonl").is_file()
    assert set(RUN_ARTEFACTS) >= {"checkpoints", "final", "metrics.jsonl", "run.json"}


# ----------------------------------------------------------------------------- 2. --init-from inside --output-dir
def test_init_from_inside_the_output_dir_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    run = tmp_path / "R"
    grpo.main(TINY + ["--output-dir", str(run), "--max-steps", "2", "--save-every", "1"])
    kept = _snapshot(run)
    for src in (run, ckpt.latest_checkpoint(run)):
        for extra in ([], ["--overwrite"]):  # not even --overwrite may delete the weights a run starts from
            e, err = _refused(capsys, TINY + ["--init-from", str(src), "--output-dir", str(run)] + extra)
            assert "lies inside --output-dir" in err
            assert _snapshot(run) == kept
    # from another folder it works, and the source stays as it was
    grpo.main(TINY + ["--init-from", str(run), "--output-dir", str(tmp_path / "next")])
    assert _snapshot(run) == kept


# ----------------------------------------------------------------------------- 3. --resume with reporters
def test_resume_keeps_the_warmup_points_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    args = TINY + ["--sft-steps", "4", "--sft-eval-every", "2", "--sft-batch-size", "8", "--sft-target-accuracy", "0",
                   "--report-to", "tensorboard", "--output-dir", str(out), "--save-every", "1"]
    grpo.main(args + ["--max-steps", "1"])
    grpo.main(args + ["--max-steps", "3", "--resume"])  # purge_step = 2: warm-up steps 2..4 were purged before

    def scalars(folder, tag):
        ea = EventAccumulator(str(folder))
        ea.Reload()
        return [e.step for e in ea.Scalars(tag)]

    assert scalars(out / "tensorboard" / "sft", "sft/loss") == [1, 2, 3, 4]
    assert scalars(out / "tensorboard", "rl/loss") == [1, 2, 3]
    assert scalars(out / "tensorboard", "eval/accuracy") == [0, 1, 2, 3]


def test_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    args = TINY + ["--report-to", "wandb", "--output-dir", str(out)]
    grpo.main(args)
    run_id = json.loads((out / "run.json").read_text())["wandb_run_id"]
    assert run_id
    grpo.main(args + ["--resume", "--max-steps", "2"])
    assert json.loads((out / "run.json").read_text())["wandb_run_id"] == run_id
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    # one W&B run, two sessions (wandb suffixes "-1" to the second folder when both start in the same second)
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", Path(r).name)
                                  for r in runs), runs
    # a new run in another folder is a new W&B run
    grpo.main(TINY + ["--report-to", "wandb", "--output-dir", str(tmp_path / "other")])
    assert json.loads((tmp_path / "other" / "run.json").read_text())["wandb_run_id"] != run_id


# ----------------------------------------------------------------------------- 4. named errors
def test_resume_with_kl_without_a_reference_is_a_named_error(tmp_path, capsys):
    out = tmp_path / "nokl"
    grpo.main(TINY + ["--output-dir", str(out)])
    kept = _snapshot(out)
    e, err = _refused(capsys, TINY + ["--output-dir", str(out), "--resume", "--max-steps", "2", "--kl-coef", "0.05"])
    assert isinstance(e.__cause__, ckpt.CheckpointError)
    assert "reference.safetensors is missing" in err and "--kl-coef 0" in err and "Traceback" not in err
    assert _snapshot(out) == kept


def test_init_from_another_model_size_is_a_named_error(tmp_path, capsys):
    src = tmp_path / "small"
    grpo.main(TINY + ["--output-dir", str(src), "--max-steps", "0"])
    target = tmp_path / "big"
    big = [a if a != "32" else "48" for a in TINY]  # --hidden-size 48
    e, err = _refused(capsys, big + ["--init-from", str(src), "--output-dir", str(target)])
    assert isinstance(e.__cause__, ckpt.CheckpointError)
    assert "does not fit this run's model" in err and "--hidden-size" in err and "step_000000" in err
    assert not (target / "metrics.jsonl").exists()
    # the default folder of a refused run is not left behind
    runs = tmp_path / "cwd"
    runs.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(runs)
        _refused(capsys, big + ["--init-from", str(src)])
    finally:
        os.chdir(cwd)
    assert not list((runs / "runs").iterdir())


# ----------------------------------------------------------------------------- 5. symlinked checkpoints
def test_a_symlinked_step_folder_is_refused(tmp_path, capsys):
    other = tmp_path / "other"
    grpo.main(TINY + ["--output-dir", str(other), "--max-steps", "1"])
    out = tmp_path / "mine"
    grpo.main(TINY + ["--output-dir", str(out), "--max-steps", "1"])
    (out / "checkpoints" / "step_000009").symlink_to(ckpt.latest_checkpoint(other), target_is_directory=True)
    (out / "checkpoints" / "latest").write_text("step_000007")  # dangling: the fallback would take step 9
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        ckpt.resolve_resume(out)
    e, err = _refused(capsys, TINY + ["--output-dir", str(out), "--resume", "--max-steps", "2"])
    assert "step_000009" in err and "symbolic link" in err
    assert (ckpt.latest_checkpoint(other) / "model.safetensors").is_file()  # the other run is untouched


# ----------------------------------------------------------------------------- 6. demo_credit
def test_demo_credit_writes_a_run_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import demo_credit

    monkeypatch.chdir(tmp_path)
    path = demo_credit.main([])
    assert Path(path) == Path("runs/demo_credit/credit_methods.png") and Path(path).stat().st_size > 1000
    assert not (tmp_path / "docs").exists()


# ----------------------------------------------------------------------------- 7. threads
def test_thread_count_follows_the_model_size_and_the_machine(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(10_000)[0] == 1
    n, why = choose_threads(TINY_MODEL_PARAMS, load=0.0)  # an idle machine: every core
    assert n == cores and "cores" in why
    assert choose_threads(TINY_MODEL_PARAMS, local_world_size=2, load=0.0)[0] == max(1, cores // 2)
    n, why = choose_threads(TINY_MODEL_PARAMS, load=float(cores))  # busy to its core count: one thread
    assert n == 1 and "load" in why
    assert choose_threads(TINY_MODEL_PARAMS, load=cores - 1.2)[0] == 1  # one core free
    assert choose_threads(10_000, requested=3) == (3, "--num-threads 3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(10**9) == (2, "OMP_NUM_THREADS=2")
    with pytest.raises(ValueError, match="num_threads"):
        choose_threads(10, requested=-1)
    assert load_config(overrides={"num_threads": "auto"}).num_threads == 0
