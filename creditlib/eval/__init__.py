"""Math evaluation for creditlib: benchmark loaders, answer checking that cannot hang or
execute model text, training rewards, pass@k and an evaluator with a resumable cache.

    from creditlib.eval import load_benchmark, is_correct, accuracy_reward
    ds = load_benchmark("math500", path="data/math500/test.jsonl")   # or from the Hub by name
    is_correct("... so the answer is $\\boxed{\\frac{1}{2}}$", "0.5")  # True
    accuracy_reward(["\\boxed{3}", "no idea"], ["3", "4"])            # [1.0, 0.0]

Submodules: :mod:`.data` (loaders), :mod:`.extract` (final-answer extraction), :mod:`.verify`
(math-verify in time-limited worker processes), :mod:`.rewards`, :mod:`.metrics` (pass@k),
:mod:`.generation` (text generators over the sampling core :mod:`creditlib.generation`), :mod:`.evaluator` (evaluation loop, cache, table),
:mod:`.selfcheck` (gold answers judged against themselves on real files). See docs/eval.md.

Layering: ``eval`` sits below ``rl``. The training recipes (:mod:`creditlib.rl`) read their
files and benchmarks, check answers and sample through this package (the verifier pool is the one
time limit on math answers); both sample through :mod:`creditlib.generation` (``generate_tokens``
is the one ``model.generate`` call, ``VLLMEngine`` the one vLLM engine); nothing here imports :mod:`creditlib.rl`.
"""

from .._extras import require

require("eval", "creditlib.eval")  # names the extra before any submodule fails on a missing package

from .data import BENCHMARKS, gold_output, load_benchmark, read_rows, reference_solution
from .evaluator import EvalResult, GenerationCache, evaluate
from .extract import extract_answer, last_boxed
from ..generation import TokenGeneration, VLLMEngine, generate_tokens  # the shared sampling core
from .generation import DEFAULT_PROMPT, Generator, HFGenerator, OracleGenerator, VLLMGenerator, build_prompt
from .metrics import avg_at_k, benchmark_metrics, pass_at_k
from .rewards import accuracy_reward, format_reward
from .selfcheck import format_self_check, self_check
from .verify import DEFAULT_TIMEOUT, VerifierPool, is_correct, is_correct_batch

__all__ = [
    "BENCHMARKS", "load_benchmark", "read_rows", "reference_solution", "gold_output",
    "extract_answer", "last_boxed",
    "is_correct", "is_correct_batch", "VerifierPool", "DEFAULT_TIMEOUT",
    "accuracy_reward", "format_reward",
    "pass_at_k", "avg_at_k", "benchmark_metrics",
    "Generator", "HFGenerator", "VLLMGenerator", "OracleGenerator", "DEFAULT_PROMPT", "build_prompt",
    "generate_tokens", "TokenGeneration", "VLLMEngine",
    "evaluate", "EvalResult", "GenerationCache",
    "self_check", "format_self_check",
]
