#!/usr/bin/env bash
# The GPU check, one script for one H100/H200 in under 8 minutes (run it through the device tool with
# carry: [".whl"] after `bash bench/gpu_wheels.sh` here; OUT=$OUT keeps its logs):
#   1. the machine: GPU, driver, torch and CUDA versions;
#   2. the CUDA tests (tests/test_cuda.py: the Triton kernels against float64 references, the bf16 ranking
#      against exact selection, a training run on the GPU against the CPU, a sharded trainer on one NCCL
#      process against the unsharded one);
#   3. the peer table on the GPU (bench/peers.py --device cuda): TopK at 2^15, 2^17 and 2^20 latents, batch
#      4096 and 16384; ours, ours with exact ranking, sparsify and SAELens where the image can import them;
#      each config's encoder forward against the dense bf16 matmul (the fraction of its rate ours reaches).
# Each step has its own time limit, so a hang in one still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links .whl pydantic
fi

echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 2. CUDA tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 3. peers on the GPU"
configs=gpu-32k-b4k,gpu-32k-b16k,gpu-128k-b4k,gpu-128k-b16k,gpu-1024k-b4k,gpu-1024k-b16k
timeout 270 "$PY" bench/peers.py --device cuda --peer-python "$(command -v "$PY")" --threads 8 --reps 1 \
    --steps 3 --warmup 2 --quality-steps 0 --configs "$configs" 2>&1 | tee "$OUT/gpu_peers.md"
