#!/usr/bin/env bash
# Run on an NVIDIA GPU machine from the repo root: the CUDA tests, then the decode latency
# grid for the Llama-3.1-8B shape (random weights). Results go to $OUT (or ./.out).
# Usage: scripts/cuda_suite.sh [tests|latency|all] [batch sizes...]
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
what=${1:-all}; shift || true
BATCHES=${*:-1 8 32 128 256}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/backends/cuda tests/backends/cpu 2>&1 | tee "$OUT/tests.txt" | tail -5
fi
if [[ $what == latency || $what == all ]]; then
  python3 -m engine.cli bench latency --backend cuda --load-format dummy --model llama-3.1-8b \
    --batch-size $BATCHES --input-len ${INPUT_LEN:-1024} --output-len ${OUTPUT_LEN:-32} \
    --max-total-tokens ${MAX_TOTAL_TOKENS:-300000} --output-json "$OUT/latency.json" 2>&1 \
    | grep -v -E "INFO|Warning|warn" | tee "$OUT/latency.txt"
fi
