"""creditlib.rl: reusable components of the GRPO / GRPO-lambda fine-tuning recipes.

The recipes in ``recipes/`` read top to bottom like the paper's algorithm box; the parts they share
live here:

* :mod:`~creditlib.rl.config` -- :class:`RecipeConfig` (typed options, YAML files, generated CLI)
* :mod:`~creditlib.rl.registry` -- tasks and datasets by name: ``register_dataset`` (one call adds one)
* :mod:`~creditlib.rl.task` -- the embedded dial-walk task and its offline tokenizer
* :mod:`~creditlib.rl.data` -- prompt sources (synthetic, GSM8K / MATH / local files) with a data position
* :mod:`~creditlib.rl.model` -- tiny Qwen2 factory, any causal LM, per-token log-probs
* :mod:`~creditlib.rl.rollout` -- :class:`HFRollout` (transformers generate) and :class:`VLLMRollout`
* :mod:`~creditlib.rl.rewards` -- :class:`SafeReward` (errors and hangs count as wrong, never stop a run)
* :mod:`~creditlib.rl.train` -- supervised warm-up, the optimizer step, evaluation
* :mod:`~creditlib.rl.checkpoint` -- safetensors checkpoints (model, optimizer, RNG, step, data position)
* :mod:`~creditlib.rl.metrics` -- ``metrics.jsonl``, PNG plot, summary table
* :mod:`~creditlib.rl.distributed` -- torchrun + FSDP2 helpers (gloo on CPU)
* :mod:`~creditlib.rl.loop` -- run-loop helpers: start point (resume / init-from), signals, summary
* :mod:`~creditlib.rl.policy` -- :class:`CompletionPolicy`, the policy as TorchRL's GRPOLoss scores it
* :mod:`~creditlib.rl.tree` -- tree rollouts: :class:`TreeSpec`, :func:`sample_tree` (``--tree-roots`` in the recipe)
* :mod:`~creditlib.rl.env` -- the environment protocol (:class:`Environment`: ``reset`` / ``step``), its
  safety guard and registry (``register_env``), the :class:`StepScorer` process-reward hook
* :mod:`~creditlib.rl.envs` -- bundled environments: ``dial-walk`` (with a process reward) and ``calculator`` (tool use)
* :mod:`~creditlib.rl.multiturn` -- multi-turn rollouts: :func:`rollout_episodes` -> :class:`EpisodeBatch`,
  :func:`evaluate_episodes`

Layering: ``rl`` is built on :mod:`creditlib.eval` (file and benchmark loading, answer checking
with its time limit, the ``generate`` / vLLM sampling core) and never the other way round.
The learning study (its statistics, plots and extra tasks) is not part of the library: it lives
in ``benchmarks/study/`` and registers its tasks through :func:`register_dataset`.
"""

from .._extras import require

require("rl", "creditlib.rl")  # names the extra before any submodule fails on a missing package

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from .config import RecipeConfig, load_config, parse_args
from .data import Example, MathSource, SyntheticSource, build_source
from .env import Environment, EnvSpec, Reset, Step, StepScorer, get_env, list_envs, register_env
from .distributed import DistInfo, finish, init_distributed, shard_model
from .multiturn import EpisodeBatch, evaluate_episodes, rollout_episodes
from .metrics import MetricsLogger, plot_metrics, read_metrics, summary_table
from .registry import DatasetSpec, get_dataset, list_datasets, register_dataset
from .model import NonFiniteError, completion_logprobs, tiny_qwen2
from .rewards import SafeReward, reward_for_dataset
from .rollout import HFRollout, RolloutBatch, VLLMRollout
from .task import ChainTask, build_char_tokenizer, chain_reward
from .train import evaluate, optimizer_step, sft_warmup

__all__ = [
    "RecipeConfig", "load_config", "parse_args",
    "ChainTask", "build_char_tokenizer", "chain_reward",
    "Example", "SyntheticSource", "MathSource", "build_source",
    "register_dataset", "get_dataset", "list_datasets", "DatasetSpec",
    "tiny_qwen2", "completion_logprobs", "NonFiniteError",
    "HFRollout", "VLLMRollout", "RolloutBatch",
    "Environment", "Reset", "Step", "StepScorer", "EnvSpec", "register_env", "get_env", "list_envs",
    "EpisodeBatch", "rollout_episodes", "evaluate_episodes",
    "SafeReward", "reward_for_dataset",
    "optimizer_step", "sft_warmup", "evaluate",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume", "CheckpointError",
    "MetricsLogger", "read_metrics", "plot_metrics", "summary_table",
    "DistInfo", "init_distributed", "shard_model", "finish",
]
