#!/usr/bin/env bash
# One prepared GPU check (issue 18/20): run it on a CUDA machine from the repository root.
#   bash benchmarks/gpu/check_all.sh [OUT_DIR]
# 1. benchmarks/gpu_check.py: every trace backend for CUDA (triton, torch) against the float64
#    reference, then recent-trace speed against x.clone() (JSON + table);
# 2. tests/test_kernel_triton.py and the tree / recipe tests that use CUDA when it is there;
# 3. recipes/grpo.py on CUDA: 3 RL steps of the synthetic task, flat GRPO-lambda and a tree
#    rollout with prefix-gae (tiny model trained from scratch: a code-path check, not a result).
# Needs python3 with torch (CUDA), triton, transformers, safetensors, pyyaml; no network.
set -u
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "== 1. gpu_check"
timeout 240 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | tail -40 || rc=1
echo "== 2. tests on CUDA"
timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernel_triton.py tests/test_gpu_check.py 2>&1 | tail -5 || rc=1
echo "== 3. recipe on CUDA"
for arm in "--credit grpo-lambda" "--credit prefix-gae --tree-roots 2 --tree-forks 1 --tree-branches 3 --tree-depth 1"; do
  name=$(echo "$arm" | tr -cs 'a-z0-9' '-' | cut -c1-40)
  timeout 150 $PY recipes/grpo.py --device cuda $arm --max-steps 3 --sft-steps 60 --eval-size 32 --eval-every 3 \
      --output-dir "/tmp/gpu_recipe_$name" --no-plot --no-progress 2>&1 | tail -12 || rc=1
done
echo "exit $rc"
exit $rc
