"""The warm-up's stopping rule (``--sft-target-window``): the MEAN of the last W validation accuracies
must reach ``--sft-target-accuracy``, so one lucky evaluation does not stop the warm-up (issue 20, item 4).

The real :func:`creditlib.rl.train.sft_warmup` trains a tiny model; only ``validate()`` is scripted (a
sequence of accuracies with one spike), so the test is about where the rule stops, not about learning.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from creditlib.rl.build import build_policy  # noqa: E402
from creditlib.rl.config import load_config, parse_args  # noqa: E402
from creditlib.rl.data import build_source  # noqa: E402
from creditlib.rl.distributed import DistInfo  # noqa: E402
from creditlib.rl.train import sft_warmup  # noqa: E402

#: Validation accuracies at warm-up steps 1, 2, 3, ...: one spike (0.60 at the 2nd evaluation), then a
#: slow climb. Target 0.45: window 1 stops at the spike; window 3 needs mean(a_{k-2..k}) >= 0.45:
#: k=2: (0.10, 0.60) too few; k=3: 0.333; k=4: 0.433; k=5: (0.30+0.40+0.50)/3 = 0.40; k=6: 0.45 -> stop.
SPIKY = [0.10, 0.60, 0.30, 0.40, 0.50, 0.45, 0.90, 0.90]


def _setup(window, sft_steps=8, target=0.45):
    cfg = load_config(overrides=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, num_ops=8,
                                     eval_size=16, sft_steps=sft_steps, sft_eval_every=1, sft_batch_size=4,
                                     sft_target_accuracy=target, sft_target_window=window, progress=False))
    model, tok = build_policy(cfg, torch.device("cpu"))
    return cfg, model, build_source(cfg, tok)


def _run(window, accs=SPIKY, **kw):
    cfg, model, source = _setup(window, **kw)
    it = iter(accs)
    calls, logged, said = [], [], []

    def validate():
        calls.append(1)
        return next(it)

    before = [p.detach().clone() for p in model.parameters()]
    res = sft_warmup(model, source, cfg, DistInfo(), torch.device("cpu"), validate, logged.append,
                     progress=False, say=said.append)
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return res, logged, said, len(calls), changed


def test_window_1_stops_on_the_spike():
    res, logged, said, calls, changed = _run(1)
    assert changed  # the real warm-up took optimizer steps
    assert res["reached_target"] and res["sft_steps"] == 2 and calls == 2
    assert res["sft_val_accuracy"] == 0.60 and res["sft_val_mean"] == 0.60
    assert "validation accuracy 0.600 reached the target 0.45 at step 2 (of at most 8)" in said[0]
    assert [r["val_accuracy"] for r in logged] == [0.10, 0.60]
    assert all("val_accuracy_mean" not in r for r in logged)  # window 1: the log is as before


def test_window_3_ignores_the_spike_and_stops_on_the_mean():
    res, logged, said, calls, changed = _run(3)
    assert changed
    assert res["reached_target"] and res["sft_steps"] == 6 and calls == 6
    assert res["sft_val_accuracy"] == 0.45
    assert res["sft_val_mean"] == pytest.approx((0.40 + 0.50 + 0.45) / 3)
    assert [r["val_accuracy"] for r in logged] == SPIKY[:6]
    means = [r["val_accuracy_mean"] for r in logged]
    want = [sum(SPIKY[max(0, k - 2):k + 1]) / len(SPIKY[max(0, k - 2):k + 1]) for k in range(6)]
    assert means == pytest.approx(want)
    assert all(m < 0.45 for m in means[:-1]) and means[-1] >= 0.45
    assert "mean validation accuracy of the last 3 evaluations 0.450 (latest 0.450) reached the target 0.45 " \
           "at step 6 (of at most 8)" in said[0]


def test_window_larger_than_the_run_never_stops_and_says_so():
    res, logged, said, calls, _ = _run(3, accs=[0.9, 0.9, 0.2], sft_steps=3, target=0.8)
    # k=3 is the first full window: (0.9 + 0.9 + 0.2) / 3 = 0.667 < 0.8; two evaluations of 0.9 did not stop it
    assert not res["reached_target"] and res["sft_steps"] == 3 and calls == 3
    assert res["sft_val_mean"] == pytest.approx(2.0 / 3)
    assert "(target 0.8 not reached by the mean of 3 evaluations)" in said[0]


def test_window_option_default_help_and_validation(capsys):
    assert load_config().sft_target_window == 1  # today's behaviour
    assert parse_args(["--sft-target-window", "4"]).sft_target_window == 4
    for bad in (0, -2):
        with pytest.raises(ValueError, match="sft_target_window must be a positive integer"):
            load_config(overrides={"sft_target_window": bad})
    with pytest.raises(SystemExit):
        parse_args(["--sft-target-window", "0"])
    assert "sft_target_window must be a positive integer" in capsys.readouterr().err
