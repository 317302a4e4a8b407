"""pytest-benchmark: one full RL training step, creditlib's recipe against TRL's ``GRPOTrainer`` (issue 6, item 4).

A step is rollout (sampling ``K x G`` completions) + verifiable reward + group advantage + loss +
backward + optimizer step, on the recipe's default shape: the embedded 495k-parameter Qwen2
(hidden 128, 2 layers), the dial-walk task (10 moves, completions of 13 tokens), ``K = 8`` prompts x
``G = 8`` completions, float32, one thread, CPU.

* ``recipe-grpo_lambda``: the RL step of ``recipes/grpo.py --credit grpo-lambda`` (trace ``recent``,
  ``lam = 0.99``, clamp ``-0.1``): the recipe's own ``setup`` and ``grpo_step`` (credit stage of
  TensorDict modules + ``GRPOLambdaLoss``), loaded from the recipe file;
* ``recipe-grpo``: the same with ``--credit grpo`` (plain GRPO);
* ``trl-GRPOTrainer``: stock TRL (``loss_type="dapo"``, token-mean like the recipe; ``beta = 0``), the
  same model weights, tokenizer, prompts, reward and shape; skipped when TRL is not installed.

Each case records ``tokens_per_step`` (generated completion tokens, EOS included) in ``extra_info``;
``tokens_per_second`` is added when timings exist (not under ``--benchmark-disable``). Run::

    python -m pytest benchmarks/test_bench_train_step.py --benchmark-columns=median,mean,rounds -s
    python -m pytest benchmarks/test_bench_train_step.py --benchmark-disable -q   # smoke: one step each

The models start untrained (throughput does not depend on accuracy here: every completion runs to
the 13-token cap or to EOS in both frameworks alike). Untrained, most rewards are 0, so many
groups have zero advantage; both frameworks still run the full forward, backward and optimizer step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from creditlib.rl.config import load_config  # noqa: E402
from creditlib.rl.task import chain_reward  # noqa: E402

K, G = 8, 8  # prompts per step, completions per prompt (the recipe defaults)
ROUNDS = 5  # timed steps per case (each a different batch of prompts)


def _recipe():
    """``recipes/grpo.py`` as a module, loaded from its file once (``recipes/`` is a folder of scripts,
    not a package)."""
    name = "bench_recipe_grpo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "recipes" / "grpo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # (dataclasses look their module up there)
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _recipe_step_fn(credit: str, out_dir):
    """The recipe's RL step as a closure: its ``setup`` and the body of its RL loop (rollout, reward,
    ``grpo_step``), on a fresh untrained model."""
    recipe = _recipe()
    cfg = load_config(overrides=dict(credit=credit, prompts_per_step=K, group_size=G, device="cpu", progress=False,
                                     output_dir=str(out_dir)))
    r = recipe.setup(cfg)
    state = {"position": 0, "tokens": [], "step": 0}

    def step():
        prompts, state["position"] = r.source.next_batch(state["position"], K)
        ids, mask = r.source.encode(prompts, r.device)  # [K, P]
        batch = r.rollout.rollout(ids, mask, G)  # [B, T] with B = K * G
        rewards, _ = r.reward(batch.texts, [e.answer for e in prompts for _ in range(G)])  # [B]
        m = recipe.grpo_step(r, batch, rewards)
        state["tokens"].append(int(batch.completion_mask.sum()))
        return m

    return step, state, (r.model, r.tokenizer, cfg, r.source)


def _finish(benchmark, state):
    tokens = sum(state["tokens"]) / max(1, len(state["tokens"]))
    benchmark.extra_info["tokens_per_step"] = tokens
    benchmark.extra_info["batch"] = f"{K} prompts x {G} completions"
    stats = getattr(benchmark, "stats", None)
    mean = getattr(getattr(stats, "stats", None), "mean", None) if stats is not None else None
    if mean:
        benchmark.extra_info["tokens_per_second"] = tokens / mean
        print(f"\n{benchmark.name}: {tokens:.0f} completion tokens/step, {mean * 1e3:.0f} ms/step, "
              f"{tokens / mean:.0f} tokens/s")
    assert tokens > K * G  # every completion holds at least one token (EOS)


@pytest.mark.parametrize("variant", ["recipe-grpo_lambda", "recipe-grpo"])
def test_recipe_train_step(benchmark, variant, tmp_path):
    torch.set_num_threads(1)
    credit = variant.split("-", 1)[1]
    step, state, _ = _recipe_step_fn(credit.replace("_", "-"), tmp_path)
    benchmark.group = "RL train step (K=8 x G=8, 13 tokens, 495k Qwen2, CPU, 1 thread)"
    benchmark.name = variant
    m = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert "loss" in m and torch.isfinite(torch.tensor(m["loss"])) and m["num_tokens"] > 0
    _finish(benchmark, state)


def test_trl_grpo_trainer_step(benchmark, tmp_path):
    pytest.importorskip("trl", reason="TRL is the optional extra creditlib[bench]/[trl]")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    _, _, (model, tok, cfg, source) = _recipe_step_fn("grpo-lambda", tmp_path)  # the same fresh weights (seed 0)
    model_dir = tmp_path / "tiny-qwen2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    exs, _ = source.next_batch(0, K * (ROUNDS + 2))
    ds = Dataset.from_dict({"prompt": [e.prompt for e in exs], "answer": [e.answer for e in exs]})

    def reward(completions, answer, **kw):
        return chain_reward(completions, answer)

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=K * G, num_generations=G,
                      max_completion_length=source.max_new_tokens, temperature=1.0, learning_rate=cfg.lr,
                      beta=0.0, loss_type="dapo", report_to="none", save_strategy="no", use_cpu=True, seed=0,
                      disable_tqdm=True, logging_steps=1000, max_steps=1000, shuffle_dataset=False)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; we drive single steps
    rows = [[ds[k] for k in range(i * K, (i + 1) * K) for _ in range(G)] for i in range(ROUNDS + 2)]
    state = {"i": 0, "tokens": []}
    tmodel = trainer.model
    tmodel.train()

    def step():
        batch = rows[state["i"] % len(rows)]
        state["i"] += 1
        loss = trainer.training_step(tmodel, batch, None)  # generate + reward + advantage + loss + backward
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        state["tokens"].append(int(trainer._buffered_inputs[0]["completion_mask"].sum()))
        return loss

    benchmark.group = "RL train step (K=8 x G=8, 13 tokens, 495k Qwen2, CPU, 1 thread)"
    benchmark.name = "trl-GRPOTrainer"
    loss = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.as_tensor(loss)).all()
    _finish(benchmark, state)
