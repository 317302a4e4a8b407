"""Recipe configuration: one typed dataclass, YAML files and a generated command line.

Every field of :class:`RecipeConfig` is documented in its ``metadata["help"]``; the command line
(``--help``) is generated from those docs, so the two cannot drift apart. Precedence, lowest
first: dataclass defaults < the recipe's own defaults < ``--config FILE.yaml`` < command-line flags.

    cfg = parse_args(argv, defaults={"credit": "grpo"})
    cfg = load_config("recipes/configs/grpo_lambda.yaml", overrides={"max_steps": 10, "lam": 0.95})
    method = resolve_credit(cfg)   # the credit method: --credit NAME with the credit options applied

Flags are the field names with dashes (``--max-steps 10``, ``--clamp-min none``); booleans take
``--flag`` / ``--no-flag``. YAML files hold a flat mapping of field names (dashes or underscores);
nested sections (``algo: {lam: 0.95}``) are accepted and flattened.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["RecipeConfig", "parse_args", "load_config", "config_to_dict", "build_parser", "resolve_credit", "credit_help",
           "INHERIT", "CREDIT_OPTIONS", "tree_spec", "check_tree", "check_env"]


def _f(default, help: str, group: str, choices=None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})



#: Value of a credit-assignment option that is not overridden: the method named by ``--credit`` decides.
INHERIT = "method"
#: The options that override a field of the credit method (default :data:`INHERIT`).
CREDIT_OPTIONS = ("advantage_scale", "advantage_baseline", "clamp_min", "trace_style", "lam", "gamma", "trace_eps",
                  "normalize", "entropy_quantile", "gae_gamma", "gae_lambda", "turn_gamma", "omega")


@dataclass
class RecipeConfig:
    """All options of the GRPO / GRPO-lambda recipes (see ``docs/recipes.md``)."""

    # ------------------------------------------------------------------ run
    output_dir: str = _f("", "The run folder (metrics.jsonl, samples.jsonl, metrics.png, checkpoints/, final/, run.json). "
                             "Empty: a new folder runs/<credit>-<task>-<YYYYmmdd-HHMMSS> for every run. A folder that "
                             "holds another run is refused unless --resume or --overwrite is given.", "run")
    seed: int = _f(0, "Seed of model init, sampling and data order (deterministic on CPU for a fixed seed).", "run")
    max_steps: int = _f(150, "Number of RL steps (each: rollout -> reward -> advantage -> update).", "run")
    resume: bool = _f(False, "Continue from the latest checkpoint in --output-dir (model, optimizer, RNG, step, data position).", "run")
    overwrite: bool = _f(False, "Start a new run in an --output-dir that holds another run: first delete that run's "
                                "files there (checkpoints/, final/, metrics.jsonl, samples.jsonl, metrics.png, "
                                "reference.safetensors, tensorboard/, wandb/, run.json; nothing else).", "run")
    init_from: str = _f("", "Start RL from the weights of a saved checkpoint (a checkpoints/step_N directory, or a run's "
                            "output directory: its latest intact checkpoint), e.g. a shared warm-up: no warm-up, a "
                            "fresh optimizer, RL step 0, the checkpoint's data position.", "run")
    report_to: str = _f("none", "Also log metrics to 'tensorboard' (event files in --output-dir/tensorboard; needs the "
                                "tensorboard package) or 'wandb' (needs wandb; WANDB_MODE=offline works offline).", "run",
                        ("none", "tensorboard", "wandb"))
    save_every: int = _f(25, "Checkpoint every N RL steps (and always at the end, on SIGTERM/SIGINT and after warm-up).", "run")
    keep_checkpoints: int = _f(2, "How many step checkpoints to keep (older ones are deleted).", "run")
    eval_every: int = _f(25, "Evaluate held-out accuracy every N RL steps (and before the first and after the last).", "run")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.", "run")
    num_threads: int = _f(0, "torch CPU threads. 0 or 'auto': 1 for a model under 20M parameters (more threads only wait "
                             "for each other, and for cores on a busy machine), else the cores this process may use "
                             "(os.sched_getaffinity) less those the 1-minute load average says are busy, at least 1; "
                             "OMP_NUM_THREADS when set. Said at start-up.", "run")
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
    dataset: str = _f("synthetic", "Task or dataset: a registered name or a local file, as "
                                   "listed above (creditlib.rl.registry).",
                      "data")
    eval_dataset: str = _f("", "Held-out set for the real path (same forms as --dataset; empty = the test split "
                               "of --dataset, or a held-out slice of a local file).", "data")
    eval_size: int = _f(512, "Number of held-out prompts evaluated (greedy decoding).", "data")
    eval_samples: int = _f(0, "Also sample K completions per held-out prompt at --temperature and log their mean "
                              "reward as sampled_accuracy beside the greedy accuracy (0 = greedy only).", "data")
    log_samples: int = _f(4, "Completions written to samples.jsonl per evaluation (prompt, completion, answer, "
                             "reward; greedy and sampled).", "data")
    num_ops: int = _f(10, "Synthetic task: moves per walk (the answer depends on every earlier step).", "data")
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
    sft_target_window: int = _f(1, "Stop warm-up once the MEAN of the last N validation accuracies reaches "
                                   "--sft-target-accuracy (a moving average, so one lucky evaluation does not stop "
                                   "it; 1 = the latest accuracy alone).", "sft")
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

    # ------------------------------------------------------------------ tree rollouts
    tree_roots: int = _f(0, "Tree rollouts (creditlib.rl.tree.sample_tree): M independent completions per prompt, "
                            "then forks; the group is the tree's leaves, M * sum_d (forks * branches)^d, which must "
                            "equal --group-size. 0 = off (G independent completions). Works with every --credit "
                            "(prefix-tree methods such as prefix-gae see the shared prefixes); transformers sampling "
                            "only (--rollout hf, --top-p 1).", "tree")
    tree_forks: int = _f(1, "Tree rollouts: fork positions N picked on every leaf of a round.", "tree")
    tree_branches: int = _f(3, "Tree rollouts: continuations sampled at each fork position (the token at the fork "
                               "is re-sampled).", "tree")
    tree_depth: int = _f(1, "Tree rollouts: rounds of forking D (0 = a flat group of --tree-roots).", "tree")
    tree_select: str = _f("entropy", "Tree rollouts: where a leaf forks: 'entropy' (its highest-entropy tokens), "
                                     "'uniform' (random positions) or 'segment' (every --tree-segment-len tokens).",
                          "tree", ("entropy", "uniform", "segment"))
    tree_min_gap: int = _f(1, "Tree rollouts: fork positions of one leaf lie at least this many tokens apart and "
                              "past the leaf's own fork point.", "tree")
    tree_segment_len: int = _f(4, "Tree rollouts: segment length S of --tree-select segment (>= --tree-min-gap).",
                               "tree")
    tree_pipeline: str = _f("auto", "Tree rollouts: fork while the parent is still decoding (one decode pass; exactly "
                                    "the trees of the two-round sampler). 'on', 'off', or 'auto': on for --tree-select "
                                    "segment (its forks are known as the parent decodes: 0.8-0.9x a flat group's wall "
                                    "time) and for entropy / uniform forks on models of 20M parameters or more (their "
                                    "forks are speculative: branches of a pick that a later token displaces are "
                                    "dropped, which a decoder bound by reading its weights absorbs: 0.97-1.0x flat at "
                                    "SmolLM2-135M's shape vs 1.3x in two rounds; on a tiny model the dropped rows cost "
                                    "what they save).", "tree", ("auto", "on", "off"))

    # ------------------------------------------------------------------ multi-turn environments
    env: str = _f("", "Multi-turn environment (creditlib.rl.env's registry, listed above): every episode is one row, "
                      "the policy's turns trained, the environment's answers masked; rewards, per-turn rewards and "
                      "state ids come from the environment. Empty = single-turn --dataset.", "env")
    max_turns: int = _f(0, "Multi-turn: turn limit of an episode (an episode still running is cut and counted as "
                           "truncated; 0 = the environment's default).", "env")
    max_turn_tokens: int = _f(0, "Multi-turn: tokens the policy may write in one turn (0 = the environment's default).",
                              "env")
    env_timeout: float = _f(5.0, "Multi-turn: seconds an environment's reset or step may take; one that raises or runs "
                                 "past this ends that episode with reward 0 (counted as failed_episodes; the run goes "
                                 "on).", "env")
    process_coef: float = _f(0.0, "Multi-turn: weight of the environment's process reward (a score of every turn, "
                                  "e.g. dial-walk: 1 when the move brought the dial closer to the target), added to "
                                  "the per-turn rewards (0 = outcome and environment rewards only).", "env")

    # ------------------------------------------------------------------ credit assignment
    credit: str = _f("grpo-lambda", "Credit-assignment method, a name from creditlib.credit's registry (listed "
                                    "above); the options of this group override its values.", "credit")
    advantage_scale: str = _f(INHERIT, "Group advantage scale: 'std' (GRPO) or 'none' (Dr. GRPO).", "credit",
                              (INHERIT, "std", "none"))
    advantage_baseline: str = _f(INHERIT, "Group baseline: 'mean' (GRPO) or 'loo' (leave-one-out, RLOO); "
                                          "group-advantage methods only.", "credit", (INHERIT, "mean", "loo"))
    clamp_min: Optional[float] = _f(INHERIT, "Negative-advantage clamp c: A <- max(A, c), c <= 0 ('none' disables).",
                                    "credit")
    trace_style: str = _f(INHERIT, "Log-ratio trace inside the loss: 'recent' (d^(t-j)), 'both' "
                                   "(max(d^(t-j), d^j)), 'sequence' (GSPO: the sequence mean) or 'none' "
                                   "(plain token ratio).", "credit", (INHERIT, "recent", "both", "sequence", "none"))
    lam: float = _f(INHERIT, "Trace decay lambda (decay d = gamma * lam; 0 = plain token ratio). Starts a "
                             "'recent' trace on a method without one.", "credit")
    gamma: float = _f(INHERIT, "Trace discount gamma (decay d = gamma * lam).", "credit")
    trace_eps: float = _f(INHERIT, "Floor eps on the trace weights (0 = none).", "credit")
    normalize: Optional[bool] = _f(INHERIT, "Row-normalise the trace weights (z_t becomes a weighted mean of "
                                            "earlier log-ratios).", "credit")
    entropy_quantile: Optional[float] = _f(INHERIT, "Keep only this top fraction of tokens by policy entropy in "
                                                    "the loss, in (0, 1] ('none' keeps every token).", "credit")
    gae_gamma: float = _f(INHERIT, "Prefix-tree methods: GAE gamma over the prefix TD error.", "credit")
    gae_lambda: float = _f(INHERIT, "Prefix-tree methods: GAE lambda over the prefix TD error (1 = the RLOO "
                                    "advantage with a prefix-conditioned baseline).", "credit")
    turn_gamma: float = _f(INHERIT, "Turn methods (turn-grpo, turn-index, anchor-state): discount of later turns' "
                                    "rewards in a turn's return G_k = sum_k' turn_gamma^(k'-k) r_k'.", "credit")
    omega: float = _f(INHERIT, "anchor-state (GiGPO): weight of the state-group advantage beside the episode's, >= 0.",
                      "credit")

    # ------------------------------------------------------------------ algorithm
    clip_eps: float = _f(0.2, "PPO clip range epsilon.", "algo")
    aggregation: str = _f("token-mean", "Loss aggregation (verl's names; seq-mean-token-sum-norm = Dr. GRPO).", "algo",
                          ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
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
               "sft_batch_size", "sft_eval_every", "sft_target_window", "ppo_epochs", "keep_checkpoints"]
        for name in pos:
            v = getattr(self, name)
            if name == "max_steps" and v == 0:
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("sft_steps", "max_new_tokens", "minibatch_size", "num_threads", "warmup_steps", "eval_samples",
                     "log_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lam", "gamma", "trace_eps", "gae_gamma", "gae_lambda", "turn_gamma", "sft_target_accuracy"):
            v = getattr(self, name)
            if v != INHERIT and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.clamp_min not in (INHERIT, None) and not (math.isfinite(self.clamp_min) and self.clamp_min <= 0):
            raise ValueError(f"clamp_min must be a finite number <= 0 or none, got {self.clamp_min}")
        if self.entropy_quantile not in (INHERIT, None) and not 0.0 < self.entropy_quantile <= 1.0:
            raise ValueError(f"entropy_quantile must be in (0, 1] or none, got {self.entropy_quantile}")
        if self.init_from and not Path(self.init_from).exists():
            raise ValueError(f"--init-from {self.init_from}: no such checkpoint or run directory")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs --output-dir: the folder of the run to continue (without one, every run "
                             "gets a new folder)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in --output-dir, "
                             "--overwrite deletes it and starts a new one")
        if self.resume and self.init_from:
            raise ValueError("--resume and --init-from exclude each other: --resume continues this run's own "
                             "checkpoints, --init-from starts a new run from another run's weights")
        if self.reward_timeout <= 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                raise ValueError(f"{f.name} must be one of {list(ch)}, got {getattr(self, f.name)!r}")
        check_tree(self)
        check_env(self)
        if self.rollout == "vllm" and not self.model:
            raise ValueError("--rollout vllm needs --model NAME_OR_PATH (the embedded model has no checkpoint vLLM can load)")
        from .registry import get_dataset  # an unknown --dataset: ValueError with "did you mean"

        if get_dataset(self.dataset).embedded and self.model and not self.env:
            raise ValueError(f"--model with --dataset {self.dataset}: that task has its own tokenizer and model; "
                             "pass --dataset gsm8k|math|PATH with a real model")
        resolve_credit(self)  # unknown --credit name ("did you mean"), or an override the method cannot take
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
    if name == "num_threads" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    if name in CREDIT_OPTIONS and isinstance(value, str) and value.strip().lower() == INHERIT:
        return INHERIT
    if name in CREDIT_OPTIONS and name in ("trace_style", "advantage_scale", "advantage_baseline") and value is None:
        value = "none" if name == "trace_style" else value  # YAML null = no trace
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
              "credit": "credit assignment (--credit NAME; each option below overrides the method's value, "
                        f"'{INHERIT}' = keep it)",
              "algo": "PPO update", "reward": "reward",
              "tree": "tree rollouts (off unless --tree-roots M > 0; the leaves per prompt must equal --group-size)",
              "env": "multi-turn environments (off unless --env NAME)"}
    for f in dataclasses.fields(RecipeConfig):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = p.add_argument_group(titles.get(g, g), credit_help() if g == "credit" else
                                             _dataset_help() if g == "data" else
                                             _env_help() if g == "env" else None)
        default = defaults.get(f.name, f.default)
        tp, optional = _base_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        if default == INHERIT:
            shown = "from --credit"
        else:
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


TREE_OPTIONS = ("tree_forks", "tree_branches", "tree_depth", "tree_select", "tree_min_gap", "tree_segment_len",
                "tree_pipeline")


def tree_spec(cfg: RecipeConfig):
    """The :class:`~creditlib.rl.tree.TreeSpec` of ``--tree-*`` (``None``: flat rollouts, ``--tree-roots 0``).

    ``ValueError`` naming the option on a bad count or ``select`` (the spec's own checks)."""
    if not cfg.tree_roots:
        return None
    from .tree import TreeSpec

    try:
        return TreeSpec(roots=cfg.tree_roots, forks=cfg.tree_forks, branches=cfg.tree_branches, depth=cfg.tree_depth,
                        select=cfg.tree_select, min_gap=cfg.tree_min_gap, segment_len=cfg.tree_segment_len)
    except ValueError as e:  # "roots must be ..." -> "--tree-roots: roots must be ..."
        name = str(e).split()[0]
        raise ValueError(f"--tree-{name.replace('_', '-')}: {e}") from None


def check_tree(cfg: RecipeConfig) -> None:
    """Refuse ``--tree-*`` options the run cannot honour, with a ``ValueError`` naming the option:
    a shape whose leaves differ from ``--group-size`` (nothing changes the group size silently),
    ``--top-p < 1`` or ``--rollout vllm`` with a tree, a ``--tree-*`` option without ``--tree-roots``."""
    if not isinstance(cfg.tree_roots, int) or cfg.tree_roots < 0:
        raise ValueError(f"tree_roots must be an integer >= 0 (0 = flat rollouts), got {cfg.tree_roots!r}")
    if not cfg.tree_roots:
        set_ = [f"--{k.replace('_', '-')}" for k in TREE_OPTIONS if getattr(cfg, k) != _FIELDS[k].default]
        if set_:
            raise ValueError(f"{', '.join(set_)} shape a tree rollout, which is off: add --tree-roots M (M >= 1)")
        return
    spec = tree_spec(cfg)
    try:
        spec.check_group_size(cfg.group_size, "group_size")
    except ValueError as e:
        raise ValueError(f"--group-size and --tree-*: {e}") from None
    if cfg.rollout != "hf":
        raise ValueError(f"--tree-roots {cfg.tree_roots} with --rollout {cfg.rollout}: tree rollouts run on "
                         "transformers only (creditlib.rl.tree.TransformersBackend); use --rollout hf")
    if cfg.top_p < 1.0:
        raise ValueError(f"--tree-roots {cfg.tree_roots} with --top-p {cfg.top_p:g}: the tree sampler draws from the "
                         "full tempered distribution (its old log-probs are of that distribution); use --top-p 1")


ENV_OPTIONS = ("max_turns", "max_turn_tokens", "process_coef")


def check_env(cfg: RecipeConfig) -> None:
    """Refuse ``--env`` combinations the run cannot honour, with a ``ValueError`` naming the option:
    an unknown environment ("did you mean"), ``--env`` with ``--dataset`` / ``--model`` / a tree /
    ``--rollout vllm``, multi-turn options without ``--env``, a negative count or weight, a
    process-reward weight for an environment without a process reward, and a credit method that
    needs state ids (``anchor-state``) without an environment to give them."""
    for name in ("max_turns", "max_turn_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0 = the environment's default), got {v!r}")
    if not (math.isfinite(cfg.process_coef) and cfg.process_coef >= 0):
        raise ValueError(f"process_coef must be a finite number >= 0, got {cfg.process_coef!r}")
    if not cfg.env_timeout > 0:
        raise ValueError(f"env_timeout must be > 0 seconds, got {cfg.env_timeout!r}")
    if not cfg.env:
        set_ = [f"--{k.replace('_', '-')}" for k in ENV_OPTIONS if getattr(cfg, k) != _FIELDS[k].default]
        if set_:
            raise ValueError(f"{', '.join(set_)} shape multi-turn episodes, which are off: add --env NAME")
        if getattr(resolve_credit(cfg).advantage_kind, "needs_states", False):
            raise ValueError(f"--credit {cfg.credit} needs the environment's state ids (anchor groups): add --env NAME "
                             "(a single-turn --dataset has none)")
        return
    from .env import get_env  # an unknown --env: ValueError with "did you mean"

    spec = get_env(cfg.env)
    if cfg.dataset != _FIELDS["dataset"].default:
        raise ValueError(f"--env {cfg.env} with --dataset {cfg.dataset}: the environment brings its own problems; "
                         "give one of the two")
    if cfg.model and spec.embedded:
        raise ValueError(f"--model with --env {cfg.env}: that environment runs with the embedded model and its "
                         "character tokenizer")
    if cfg.tree_roots:
        raise ValueError(f"--tree-roots with --env {cfg.env}: tree rollouts are single-turn; use one of the two")
    if cfg.rollout != "hf":
        raise ValueError(f"--rollout {cfg.rollout} with --env {cfg.env}: multi-turn rollouts run on transformers "
                         "(--rollout hf)")
    if cfg.process_coef > 0 and spec.process_reward is None:
        raise ValueError(f"--process-coef {cfg.process_coef:g}: --env {cfg.env} has no process reward")


def config_to_dict(cfg: RecipeConfig) -> dict:
    return dataclasses.asdict(cfg)


def _dataset_help() -> str:
    """The registered tasks / datasets with their descriptions (for ``--help``; owner: registry)."""
    from .registry import describe_datasets

    return "registered tasks and datasets (--dataset NAME): " + describe_datasets()


def _env_help() -> str:
    """The registered environments with their descriptions (for ``--help``; owner: creditlib.rl.env)."""
    try:
        from .env import get_env, list_envs
    except ImportError:  # pragma: no cover - the rl extra is missing
        return ""
    return "registered environments (--env NAME): " + "; ".join(f"{n}: {get_env(n).description}" for n in list_envs())


def credit_help() -> str:
    """The registered credit methods, one per line with its description (for ``--help``)."""
    from ..credit import get_credit, list_credits

    names = list_credits()
    w = max(len(n) for n in names)
    return "methods:\n" + "\n".join(f"  {n.ljust(w)}  {get_credit(n).description}" for n in names)


def resolve_credit(cfg: RecipeConfig):
    """The :class:`~creditlib.credit.CreditMethod` a config selects: ``--credit NAME`` with the overrides.

    * ``advantage_scale``, ``advantage_baseline``, ``clamp_min``, ``entropy_quantile`` replace the
      method's fields; ``gae_gamma`` / ``gae_lambda`` its GAE ``gamma`` / ``lam`` (prefix-tree methods);
    * ``trace_style``, ``lam``, ``gamma``, ``trace_eps``, ``normalize`` edit its loss-side trace
      (:class:`~creditlib.DecayStyle`); on a method without one they start from ``DecayStyle()``
      (``recent``, ``lam = 0.99``); ``trace_style none`` or a trace that is the identity
      (``lam = 0``) leaves the plain token ratio (``trace = None``).

    So ``--credit grpo --lam 0.99 --clamp-min -0.1`` is ``grpo-lambda``, and ``--credit grpo-lambda
    --lam 0 --clamp-min none`` is ``grpo``. Raises ``ValueError`` (an unknown name, with "did you
    mean"; an override the method does not take, e.g. ``--gae-lambda`` on a group method).
    """
    from ..credit import get_credit
    from ..style import DecayStyle

    method = get_credit(cfg.credit)
    changes = {}
    for opt, fld in (("advantage_scale", "scale"), ("advantage_baseline", "baseline"), ("clamp_min", "clamp_min"),
                     ("entropy_quantile", "entropy_quantile"), ("gae_gamma", "gae_gamma"), ("gae_lambda", "gae_lam"),
                     ("turn_gamma", "turn_gamma"), ("omega", "omega")):
        v = getattr(cfg, opt)
        if v != INHERIT:
            changes[fld] = v
    trace_opts = {k: getattr(cfg, k) for k in ("trace_style", "lam", "gamma", "trace_eps", "normalize")
                  if getattr(cfg, k) != INHERIT}
    if trace_opts:
        base = method.trace or DecayStyle()
        kind = trace_opts.get("trace_style", base.style)
        if kind == "none":
            changes["trace"] = None
        else:
            style = DecayStyle(kind, gamma=trace_opts.get("gamma", base.gamma), lam=trace_opts.get("lam", base.lam),
                               eps=trace_opts.get("trace_eps", base.eps),
                               normalize=bool(trace_opts.get("normalize", base.normalize)))
            changes["trace"] = None if style.is_identity() else style
    if not changes:
        return method
    try:
        return method.replace(**changes)
    except ValueError as e:
        raise ValueError(f"--credit {method.name}: {e}") from None
