#!/usr/bin/env python
"""Evaluate a model on the math benchmarks of the GRPO-lambda paper.

    python recipes/eval_math.py --model Qwen/Qwen2.5-Math-1.5B \\
        --benchmarks math500,aime24,amc23,minerva_math,olympiadbench \\
        --data-dir data --n-samples 8 --temperature 0.6 --max-new-tokens 3072 \\
        --output outputs/eval/qwen-math-1.5b.json

prints the paper-style table (one column per benchmark, then the average; pass@1 = mean
accuracy over the n samples, pass@k by the unbiased estimator) and writes the JSON results.
Generations go to a JSONL cache beside the JSON (``--cache``); rerun the same command after an
interruption and it continues where it stopped.

Other modes:
    --self-check DIR   judge every gold solution / gold answer of DIR/<benchmark>/*.jsonl
                       against its gold answer (the checker's self-consistency), print the table
    --oracle           use the gold solutions as the "model" (checks the pipeline; scores 100)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PAPER_BENCHMARKS = "math500,aime24,amc23,minerva_math,olympiadbench"


class _DefaultsOnce(argparse.HelpFormatter):
    """Appends ``(default: X)`` once: not when the help already states its default, nor for unset
    options (None, False, an empty list), which ``ArgumentDefaultsHelpFormatter`` would print as
    ``(default: None)`` beside a help text that gives the real default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from creditlib.eval import BENCHMARKS, DEFAULT_PROMPT, DEFAULT_TIMEOUT

    p = argparse.ArgumentParser(
        prog="eval_math.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_DefaultsOnce,
    )
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", help="hub name or local path of a causal LM (required unless --oracle/--self-check)")
    src.add_argument("--tokenizer", help="tokenizer name/path if it differs from --model")
    src.add_argument("--benchmarks", default=PAPER_BENCHMARKS,
                     help=f"comma-separated benchmark names, among: {','.join(BENCHMARKS)}")
    src.add_argument("--data-dir", help="folder with <benchmark>/test.jsonl in the publishers' formats; "
                                        "without it (and without --data) benchmarks load from the Hugging Face Hub")
    src.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                     help="a local JSONL/Parquet file for one benchmark (repeatable; overrides --data-dir)")
    src.add_argument("--limit", type=int, help="evaluate only the first LIMIT problems of each benchmark")
    src.add_argument("--oracle", action="store_true", help="answer with the gold solutions instead of a model")
    src.add_argument("--self-check", metavar="DIR",
                     help="check the checker: gold solutions/answers of DIR/<benchmark>/*.jsonl judged against "
                          "their gold answers; prints rates and wall time, then exits")

    gen = p.add_argument_group("generation")
    gen.add_argument("--rollout", choices=["hf", "vllm"], default="hf",
                     help="generation backend: transformers generate, or the vLLM engine the recipes share "
                          "(creditlib.generation.VLLMEngine; needs vLLM)")
    gen.add_argument("--n-samples", type=int, default=1, help="completions per problem (n)")
    gen.add_argument("--k", default=None,
                     help="comma-separated k for pass@k (default: powers of two up to n, and n)")
    gen.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling p")
    gen.add_argument("--max-new-tokens", type=int, default=3072, help="completion length cap")
    gen.add_argument("--batch-size", type=int, default=8,
                     help="prompts per generate call (hf); the cache is written after each call")
    gen.add_argument("--prompt-template", default=DEFAULT_PROMPT,
                     help="user message; {problem} is replaced by the problem text (default: the Qwen2.5-Math "
                          "wording, creditlib.eval.DEFAULT_PROMPT: '{problem}' then 'Please reason step by step, "
                          "and put your final answer within \\boxed{}.')")
    gen.add_argument("--system-prompt", default=None, help="optional system message for the chat template")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--dtype", default="auto", help="model dtype for loading (auto, bfloat16, float32, ...)")
    gen.add_argument("--device", default=None, help="device for --rollout hf (default: cuda if available, else cpu)")
    gen.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM engine memory fraction")

    out = p.add_argument_group("scoring and output")
    out.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-answer verification limit, seconds")
    out.add_argument("--no-last-number", action="store_true",
                     help="do not accept a bare last number when an output states no boxed/'answer is' answer")
    out.add_argument("--output", help="results JSON (default: outputs/eval/<model>.json)")
    out.add_argument("--cache", help="generation cache JSONL (default: <output>.generations.jsonl)")
    out.add_argument("--no-cache", action="store_true", help="keep generations in memory only (not resumable)")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _parse_list(s: str | None, cast=str):
    return [cast(x.strip()) for x in s.split(",") if x.strip()] if s else None


def run_self_check(args) -> int:
    from creditlib.eval import format_self_check, self_check

    names = _parse_list(args.benchmarks) if args.benchmarks != PAPER_BENCHMARKS else None
    t0 = time.perf_counter()
    if not args.no_progress:
        print("self-check: starting the verification workers (math-verify takes a few seconds to import)...",
              file=sys.stderr, flush=True)
    results = self_check(args.self_check, benchmarks=names, timeout=args.timeout, progress=not args.no_progress)
    print(format_self_check(results))
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s (includes starting the verification workers)")
    for r in results:
        for f in r.failures[:40]:
            extra = f" -> {f['perturbed']!r}" if "perturbed" in f else ""
            print(f"  {r.benchmark} row {f['row']} ({f['kind']}): gold {f['answer']!r}{extra}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump([{**r.__dict__, "solution_rate": r.solution_rate, "answer_rate": r.answer_rate} for r in results],
                      fh, indent=2)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.self_check:
        return run_self_check(args)
    from creditlib.eval import BENCHMARKS, OracleGenerator, evaluate
    from creditlib.eval.evaluator import _load

    names = _parse_list(args.benchmarks)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        import difflib

        hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, list(BENCHMARKS), n=1))
                 else repr(n) for n in unknown]
        print(f"error: unknown benchmark(s) {', '.join(hints)}; choose among {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    if not args.model and not args.oracle:
        print("error: --model is required (or --oracle, or --self-check DIR)", file=sys.stderr)
        return 2
    paths = {}
    for item in args.data:
        if "=" not in item:
            print(f"error: --data expects NAME=PATH, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        paths[k.strip()] = v.strip()
    try:
        datasets = _load(names, None, paths, args.data_dir, args.limit)  # fail early on data problems
    except RuntimeError as e:  # the Hub is unreachable
        print(f"error: {e}\nOffline? Pass --data-dir DIR (holding <benchmark>/test.jsonl) or --data NAME=FILE.",
              file=sys.stderr)
        return 2

    model_tag = "oracle" if args.oracle else args.model
    settings = {"model": model_tag, "rollout": args.rollout, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "system_prompt": args.system_prompt, "seed": args.seed}
    if args.oracle:
        generator = OracleGenerator.from_datasets(datasets)
    elif args.rollout == "vllm":
        from creditlib.eval import VLLMGenerator

        try:
            generator = VLLMGenerator(args.model, temperature=args.temperature, top_p=args.top_p,
                                      max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
                                      seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from creditlib.eval import HFGenerator

        tok = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        generator = HFGenerator(args.model, tok, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                system_prompt=args.system_prompt, seed=args.seed, dtype=args.dtype,
                                device=args.device)

    safe = model_tag.rstrip("/").replace("/", "__").replace(os.sep, "__")
    output = args.output or os.path.join("outputs", "eval", f"{safe}.json")
    cache = None if args.no_cache else (args.cache or os.path.splitext(output)[0] + ".generations.jsonl")
    res = evaluate(generator, names, n_samples=args.n_samples, ks=_parse_list(args.k, int),
                   datasets={n: datasets[n] for n in names}, limit=None, prompt_template=args.prompt_template,
                   cache_path=cache, settings=settings, chunk_size=args.batch_size, timeout=args.timeout,
                   last_number_fallback=not args.no_last_number, progress=not args.no_progress)
    res.settings["limit"] = args.limit
    print(res.table())
    res.save(output)
    print(f"\nresults: {output}" + (f"\ngenerations cache: {cache}" if cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
