"""Recipe configuration: one typed dataclass, YAML files and a generated command line.

Every field of :class:`RecipeConfig` is documented in its ``metadata["help"]``; the command line
(``--help``) is generated from those docs, so the two cannot drift apart. Precedence, lowest
first: dataclass defaults < the recipe's own defaults < ``--config FILE.yaml`` < command-line flags.

    cfg = parse_args(argv, defaults={"lam": 0.0, "clamp_min": None})
    cfg = load_config("recipes/configs/grpo_lambda_qwen.yaml", overrides={"max_steps": 10})

Flags are the field names with dashes (``--max-steps 10``, ``--clamp-min none``); booleans take
``--flag`` / ``--no-flag``. YAML files hold a flat mapping of field names (dashes or underscores);
nested sections (``algo: {lam: 0.95}``) are accepted and flattened.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["RecipeConfig", "parse_args", "load_config", "config_to_dict", "build_parser"]


def _f(default, help: str, group: str, choices=None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


SYNTHETIC_DATASETS = ("synthetic", "synthetic-early")  # embedded tasks with their own tokenizer


@dataclass
class RecipeConfig:
    """All options of the GRPO / GRPO-lambda recipes (see ``docs/recipes.md``)."""

    # ------------------------------------------------------------------ run
    output_dir: str = _f("runs/grpo_lambda_qwen", "Directory for metrics.jsonl, metrics.png, checkpoints/ and final/.", "run")
    seed: int = _f(0, "Seed of model init, sampling and data order (deterministic on CPU for a fixed seed).", "run")
    max_steps: int = _f(150, "Number of RL steps (each: rollout -> reward -> advantage -> update).", "run")
    resume: bool = _f(False, "Continue from the latest checkpoint in --output-dir (model, optimizer, RNG, step, data position).", "run")
    save_every: int = _f(25, "Checkpoint every N RL steps (and always at the end, on SIGTERM/SIGINT and after warm-up).", "run")
    keep_checkpoints: int = _f(2, "How many step checkpoints to keep (older ones are deleted).", "run")
    eval_every: int = _f(25, "Evaluate held-out accuracy every N RL steps (and before the first and after the last).", "run")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.", "run")
    num_threads: int = _f(0, "torch CPU threads (0 = leave torch's default).", "run")
    progress: bool = _f(True, "Show a tqdm progress bar with live reward / accuracy.", "run")
    plot: bool = _f(True, "Write metrics.png (reward and held-out accuracy against step) at the end.", "run")

    # ------------------------------------------------------------------ model
    model: str = _f("", "Hub name or local path of any causal LM (e.g. Qwen/Qwen2.5-1.5B-Instruct). "
                        "Empty = the embedded tiny Qwen2 built from a config (offline).", "model")
    hidden_size: int = _f(128, "Embedded model: hidden size.", "model")
    num_layers: int = _f(2, "Embedded model: number of decoder layers.", "model")
    num_heads: int = _f(4, "Embedded model: attention heads (key/value heads = heads / 2).", "model")
    intermediate_size: int = _f(512, "Embedded model: MLP width.", "model")
    dtype: str = _f("auto", "Parameter dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16', 'float16'.", "model",
                    ("auto", "float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (saves memory on large models).", "model")
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers ('sdpa', 'eager', 'flash_attention_2').", "model")

    # ------------------------------------------------------------------ data
    dataset: str = _f("synthetic", "'synthetic' (embedded dial-walk task), 'synthetic-early' (early-decision task: "
                                   "the first completion token decides, filler follows), 'gsm8k', 'math' (MATH500 for eval, "
                                   "MATH train for RL), or a local .jsonl/.json/.parquet file with problem/question and answer fields.",
                      "data")
    eval_dataset: str = _f("", "Held-out set for the real path (same forms as --dataset; empty = the test split "
                               "of --dataset, or a held-out slice of a local file).", "data")
    eval_size: int = _f(512, "Number of held-out prompts evaluated (greedy decoding).", "data")
    num_ops: int = _f(10, "Synthetic task: moves per walk (the answer depends on every earlier step).", "data")
    filler_length: int = _f(24, "Early-decision task (--dataset synthetic-early): characters after the decisive "
                                "first token, none of which affects the reward.", "data")
    data_seed: int = _f(1234, "Synthetic task: seed of the problem generator (fixes the held-out split across --seed).", "data")
    max_prompt_length: int = _f(512, "Real path: prompts longer than this many tokens are dropped.", "data")
    max_new_tokens: int = _f(0, "Completion length cap (0 = task default: num_ops + 3 for the synthetic task, 512 otherwise).", "data")
    chat_template: str = _f("auto", "'auto' (use the tokenizer's chat template when it has one), 'on', or 'off' (plain prompt).", "data",
                            ("auto", "on", "off"))
    instruction: str = _f("Please reason step by step, and put your final answer within \\boxed{}.",
                          "Real path: instruction appended to each problem.", "data")

    # ------------------------------------------------------------------ warm-up
    sft_steps: int = _f(400, "Maximum supervised warm-up steps (0 = none). Real path: needs a 'solution' field.", "sft")
    sft_target_accuracy: float = _f(0.45, "Stop warm-up once validation accuracy reaches this (leaves headroom for RL; 0 = run all steps).", "sft")
    sft_eval_every: int = _f(25, "Check validation accuracy every N warm-up steps.", "sft")
    sft_batch_size: int = _f(64, "Warm-up batch size (sequences).", "sft")
    sft_lr: float = _f(1e-3, "Warm-up learning rate (AdamW).", "sft")

    # ------------------------------------------------------------------ rollout
    rollout: str = _f("hf", "Rollout engine: 'hf' (transformers generate) or 'vllm' (colocated vLLM, weights synced after each update).",
                      "rollout", ("hf", "vllm"))
    prompts_per_step: int = _f(16, "Prompts per RL step (global, split over data-parallel ranks).", "rollout")
    group_size: int = _f(8, "Completions per prompt G (the group of the critic-free baseline).", "rollout")
    temperature: float = _f(0.7, "Sampling temperature (log-probs are those of the tempered policy, so the ratio is exact).", "rollout")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off).", "rollout")
    vllm_gpu_memory_utilization: float = _f(0.3, "vLLM: fraction of GPU memory for the colocated engine.", "rollout")

    # ------------------------------------------------------------------ algorithm
    lam: float = _f(0.99, "Trace decay lambda (0 = plain GRPO).", "algo")
    gamma: float = _f(1.0, "Discount gamma of the trace (decay = gamma * lam).", "algo")
    trace_style: str = _f("recent", "Trace weights: 'recent' (d^(t-j)) or 'both' (max(d^(t-j), d^j)).", "algo", ("recent", "both"))
    trace_eps: float = _f(0.0, "Floor eps on the trace weights (0 = none).", "algo")
    clamp_min: Optional[float] = _f(-0.1, "Negative-advantage clamp c: A <- max(A, c) ('none' disables).", "algo")
    clip_eps: float = _f(0.2, "PPO clip range epsilon.", "algo")
    aggregation: str = _f("token-mean", "Loss aggregation (verl's names; seq-mean-token-sum-norm = Dr. GRPO).", "algo",
                          ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    advantage_scale: str = _f("std", "Group advantage scale: 'std' (GRPO) or 'none' (Dr. GRPO).", "algo", ("std", "none"))
    advantage_baseline: str = _f("mean", "Group baseline: 'mean' (GRPO) or 'loo' (leave-one-out, RLOO).", "algo", ("mean", "loo"))
    kl_coef: float = _f(0.0, "KL-to-reference coefficient (> 0 loads a frozen reference: the warm-up result or the initial model).", "algo")
    lr: float = _f(1e-4, "RL learning rate (AdamW; peak after the warm-up).", "algo")
    warmup_steps: int = _f(20, "Linear learning-rate warm-up over the first N RL steps (Adam's first updates are otherwise full-size).", "algo")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "algo")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", "algo")
    ppo_epochs: int = _f(1, "Passes over each rollout batch.", "algo")
    minibatch_size: int = _f(0, "Completions per optimizer step (0 = the whole batch); ppo_epochs * batch/minibatch optimizer steps per RL step.",
                             "algo")

    # ------------------------------------------------------------------ reward
    reward_timeout: float = _f(5.0, "Seconds per sample before a reward call counts as wrong (it never stops the run).", "reward")

    def validate(self) -> "RecipeConfig":
        """Raise ``ValueError`` naming the first bad option."""
        pos = ["max_steps", "prompts_per_step", "group_size", "eval_size", "num_ops", "save_every", "eval_every",
               "sft_batch_size", "sft_eval_every", "ppo_epochs", "keep_checkpoints", "filler_length"]
        for name in pos:
            v = getattr(self, name)
            if name == "max_steps" and v == 0:
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("sft_steps", "max_new_tokens", "minibatch_size", "num_threads", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lam", "gamma", "trace_eps", "sft_target_accuracy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.clamp_min is not None and self.clamp_min > 0:
            raise ValueError(f"clamp_min must be <= 0 or none, got {self.clamp_min}")
        if self.reward_timeout <= 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                raise ValueError(f"{f.name} must be one of {list(ch)}, got {getattr(self, f.name)!r}")
        if self.rollout == "vllm" and not self.model:
            raise ValueError("--rollout vllm needs --model NAME_OR_PATH (the embedded model has no checkpoint vLLM can load)")
        if self.dataset in SYNTHETIC_DATASETS and self.model:
            raise ValueError("--model with --dataset synthetic: the synthetic task has its own tokenizer; "
                             "pass --dataset gsm8k|math|PATH with a real model")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(RecipeConfig)}
_HINTS = typing.get_type_hints(RecipeConfig)


def _base_type(name: str):
    tp = _HINTS[name]
    args = typing.get_args(tp)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _convert(name: str, value: Any) -> Any:
    """Convert a YAML / command-line value to the field's type; ValueError names the field."""
    tp, optional = _base_type(name)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name} cannot be none (expected {tp.__name__})")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} expects {tp.__name__}{' or none' if optional else ''}, got {value!r}") from None


def _flatten_yaml(d: dict, out: dict, where: str) -> dict:
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if isinstance(v, dict) and key not in _FIELDS:
            _flatten_yaml(v, out, f"{where}{k}.")
            continue
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=3)
            raise ValueError(f"unknown option {where}{k!r} in config file" + (f" (did you mean {close}?)" if close else ""))
        out[key] = _convert(key, v)
    return out


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None,
                defaults: Optional[dict] = None) -> RecipeConfig:
    """Build a validated :class:`RecipeConfig` from defaults, a YAML file and overrides (in that order)."""
    values: dict = {}
    for src in (defaults or {}), ({} if path is None else _read_yaml(path)), (overrides or {}):
        for k, v in src.items():
            key = k.replace("-", "_")
            if key not in _FIELDS:
                close = difflib.get_close_matches(key, _FIELDS, n=3)
                raise ValueError(f"unknown option {k!r}" + (f" (did you mean {close}?)" if close else ""))
            values[key] = _convert(key, v)
    return RecipeConfig(**values).validate()


def _read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: file {path!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping of option: value, got {type(data).__name__}")
    return _flatten_yaml(data, {}, "")


def build_parser(prog: Optional[str] = None, description: Optional[str] = None,
                 defaults: Optional[dict] = None) -> argparse.ArgumentParser:
    """The command line generated from :class:`RecipeConfig`'s field docs (one flag per field)."""
    defaults = defaults or {}
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of options (field names as keys); flags given here override it.")
    groups: dict = {}
    titles = {"run": "run", "model": "model", "data": "data", "sft": "supervised warm-up", "rollout": "rollout",
              "algo": "algorithm (GRPO-lambda; lam=0 and clamp none = GRPO)", "reward": "reward"}
    for f in dataclasses.fields(RecipeConfig):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = p.add_argument_group(titles.get(g, g))
        default = defaults.get(f.name, f.default)
        tp, optional = _base_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        shown = "none" if default is None else repr(default) if isinstance(default, str) else default
        help_ = f"{f.metadata['help']} (default: {shown})"
        if tp is bool:
            groups[g].add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
        else:
            meta = "X|none" if optional else tp.__name__.upper()
            groups[g].add_argument(flag, dest=f.name, metavar=meta, default=argparse.SUPPRESS,
                                   choices=f.metadata.get("choices"), help=help_,
                                   type=(lambda s, n=f.name: s))  # converted (and validated) in load_config
    return p


def parse_args(argv: Optional[list] = None, defaults: Optional[dict] = None, prog: Optional[str] = None,
               description: Optional[str] = None) -> RecipeConfig:
    """Parse a recipe command line into a validated :class:`RecipeConfig`.

    ``defaults``: the recipe's own defaults (e.g. the GRPO baseline sets ``lam=0, clamp_min=None``).
    Bad values exit with argparse's usage message naming the option.
    """
    parser = build_parser(prog, description, defaults)
    ns = vars(parser.parse_args(argv))
    path = ns.pop("config")
    try:
        return load_config(path, overrides=ns, defaults=defaults)
    except ValueError as e:
        parser.error(str(e))


def config_to_dict(cfg: RecipeConfig) -> dict:
    return dataclasses.asdict(cfg)
