"""The registry of tasks and datasets the recipes can train on: one call registers one.

A dataset is a name, a builder that makes its prompt source, and its verifiable reward::

    from creditlib.rl.registry import register_dataset

    register_dataset("my-task", lambda cfg, tokenizer: SyntheticSource(MyTask(...), tokenizer),
                     reward=my_reward, description="what it is", embedded=True)

after which ``--dataset my-task`` works in every recipe run in that process: the prompt source
(:func:`build_source`), the reward (:func:`creditlib.rl.rewards.reward_for_dataset`),
the config's validation and its ``--help`` all read this one table. Built in:

* ``synthetic``: the embedded dial-walk task (:mod:`creditlib.rl.task`) for the embedded model;
* ``gsm8k``, ``math``: math word problems from the Hub (GSM8K; MATH train / MATH500 held out),
  rewarded by math-verify (:func:`creditlib.eval.rewards.accuracy_reward`).

Any other ``--dataset`` value is a local ``.jsonl`` / ``.json`` / ``.parquet`` file of math rows
(see :func:`creditlib.rl.data.normalize_math_row`). An unknown name that is not such a file is a
``ValueError`` with a "did you mean" suggestion.

Builder: ``builder(cfg, tokenizer) -> source`` (a :class:`~creditlib.rl.data.SyntheticSource`,
:class:`~creditlib.rl.data.MathSource` or anything with their ``next_batch / heldout /
validation / encode / encode_sft`` methods). Reward: ``fn(completions, answers) -> list[float]``;
a reward that bounds its own time takes a ``timeout=`` keyword and says so with a function
attribute ``bounded_time = True`` (see :class:`~creditlib.rl.rewards.SafeReward`).

This module imports nothing heavy (no torch, no transformers): the config validates against it.
Nor does it import :mod:`creditlib.rl.data` at import time (the built-in builders import it when
called), and :mod:`creditlib.rl.data` does not import this module: no import cycle.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

__all__ = ["DatasetSpec", "register_dataset", "get_dataset", "list_datasets", "describe_datasets",
           "normalize_name", "build_source", "FILE_SUFFIXES"]

#: Suffixes of the local files ``--dataset PATH`` accepts.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    """One registered task or dataset.

    Attributes:
        name: the ``--dataset`` value.
        builder: ``builder(cfg, tokenizer) -> source``.
        reward: ``reward(completions, answers) -> list[float]`` (1.0 = correct).
        description: one line for ``--help``.
        embedded: the task brings its own tokenizer and runs with the embedded model only
            (``--model`` is then refused).
    """

    name: str
    builder: Callable[[Any, Any], Any]
    reward: Callable[[List[str], List[str]], Sequence[float]]
    description: str
    embedded: bool = False

    def build(self, cfg, tokenizer):
        """The prompt source for ``cfg`` (``cfg.dataset`` is this dataset's name or file)."""
        return self.builder(cfg, tokenizer)


_REGISTRY: Dict[str, DatasetSpec] = {}


def register_dataset(name: str, builder: Callable[[Any, Any], Any], *, reward: Callable, description: str,
                     embedded: bool = False, overwrite: bool = False) -> DatasetSpec:
    """Register a task or dataset under ``name`` (one call; see the module docstring).

    The name is normalised (:func:`normalize_name`: surrounding spaces dropped, lower case, ``_`` ->
    ``-``), the rule the credit registry uses: ``"My_Task"`` registers ``my-task``, and
    ``--dataset My_Task`` / ``--dataset my-task`` both find it.

    Raises ``ValueError`` for an empty or path-like name, a name whose normalised form is already
    registered (unless ``overwrite=True``), or a builder / reward that is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    name = normalize_name(name)
    if any(c.isspace() for c in name):
        raise ValueError(f"name must not contain spaces, got {name!r}")
    if os.sep in name or (os.altsep and os.altsep in name) or name.endswith(FILE_SUFFIXES):
        raise ValueError(f"name must not look like a file path (those are local datasets), got {name!r}")
    if not callable(builder):
        raise ValueError(f"builder must be callable as builder(cfg, tokenizer), got {type(builder).__name__}")
    if not callable(reward):
        raise ValueError(f"reward must be callable as reward(completions, answers), got {type(reward).__name__}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string (it is shown by --help)")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (names are compared after normalisation; "
                         "pass overwrite=True to replace it)")
    spec = DatasetSpec(name, builder, reward, description.strip(), bool(embedded))
    _REGISTRY[name] = spec
    return spec


def normalize_name(name: str) -> str:
    """The registry key of ``name``: surrounding spaces dropped, lower case, ``_`` -> ``-``."""
    return name.strip().lower().replace("_", "-")


def list_datasets() -> List[str]:
    """Registered dataset names, in registration order."""
    return list(_REGISTRY)


def describe_datasets() -> str:
    """``'name' (description); ...`` for every registered dataset, then the local-file form."""
    parts = [f"'{s.name}' ({s.description})" for s in _REGISTRY.values()]
    return "; ".join(parts) + f"; or a local {'/'.join(FILE_SUFFIXES)} file with problem/question and answer fields"


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(FILE_SUFFIXES) or os.sep in name or (os.altsep or os.sep) in name


def get_dataset(name: str) -> DatasetSpec:
    """The spec for ``--dataset name``: a registered name, or a local file (the math-file spec).

    Raises ``ValueError``: an unknown name (with the closest registered names), a path that does
    not exist, or a file with an unsupported suffix.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"dataset must be a registered name or a local file, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not _looks_like_path(name) and normalize_name(name) in _REGISTRY:
        return _REGISTRY[normalize_name(name)]
    if _looks_like_path(name) or os.path.isfile(name):
        if not name.lower().endswith(FILE_SUFFIXES):
            raise ValueError(f"dataset file {name!r} must end in {', '.join(FILE_SUFFIXES)}")
        if not os.path.isfile(name):
            raise ValueError(f"dataset file {name!r} does not exist (--dataset takes a registered name "
                             f"{list_datasets()} or a local {'/'.join(FILE_SUFFIXES)} file)")
        return DatasetSpec(name, _build_math, _math_reward, "local math file")
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"unknown dataset {name!r}{hint}; --dataset takes one of {list_datasets()} "
                     f"or a local {'/'.join(FILE_SUFFIXES)} file")


def build_source(cfg, tokenizer):
    """The prompt source a :class:`~creditlib.rl.config.RecipeConfig` asks for (``cfg.dataset``
    looked up here; an unknown name is a ``ValueError`` with a suggestion)."""
    return get_dataset(cfg.dataset).build(cfg, tokenizer)


# ----------------------------------------------------------------------------- built-ins
def _build_synthetic(cfg, tokenizer):
    from .data import SyntheticSource
    from .task import ChainTask

    return SyntheticSource(ChainTask(cfg.num_ops, cfg.data_seed, {"test": cfg.eval_size, "val": 256}), tokenizer)


def _build_math(cfg, tokenizer):
    from .data import MathSource

    dataset = cfg.dataset
    if not _looks_like_path(dataset) and normalize_name(dataset) in _REGISTRY:
        dataset = normalize_name(dataset)  # "GSM8K" -> "gsm8k": MathSource knows the registered spellings
    return MathSource(dataset, tokenizer, eval_dataset=cfg.eval_dataset, chat=cfg.chat_template,
                      instruction=cfg.instruction, max_prompt_length=cfg.max_prompt_length, seed=cfg.seed,
                      eval_size=cfg.eval_size)


def _chain_reward(completions, answers):
    from .task import chain_reward

    return chain_reward(completions, answers)


def _math_reward(completions, answers, *, timeout: float = 5.0):
    """math-verify on the final answer (``\\boxed{}`` / ``####`` / "the answer is"), each sample
    bounded by ``timeout`` seconds in a worker process (:mod:`creditlib.eval.verify`)."""
    from creditlib.eval.rewards import accuracy_reward

    return accuracy_reward(completions, answers, timeout=timeout)


_math_reward.bounded_time = True


register_dataset("synthetic", _build_synthetic, reward=_chain_reward, embedded=True,
                 description="embedded dial-walk task: a start digit and +/- moves, solved step by step")
register_dataset("gsm8k", _build_math, reward=_math_reward,
                 description="GSM8K from the Hub: train split for RL, test split held out")
register_dataset("math", _build_math, reward=_math_reward,
                 description="MATH from the Hub: MATH train for RL, MATH500 held out")
