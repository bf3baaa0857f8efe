#!/usr/bin/env bash
# Weight updates on one GPU (issue 23, goal: LLM.update_weights in-process from device arrays
# in under 1 s for the 8B shape). Run from the repo root; results under $OUT (or ./.out):
#   weights_8b.json / .log   engine bench weights, Llama-3.1-8B shape, bf16, dummy weights:
#                            the float form (wq/wk/wv as a trainer holds them: fused on the
#                            device) and the serving form, 3 updates each, and whether the
#                            next generate compiled any step program (it must not)
# About 2 minutes of GPU time (start-up, one short generate's compiles, 6 updates).
set -euo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
$PY -m engine.cli bench weights --backend cuda --load-format dummy --model llama-3.1-8b \
  --max-total-tokens 16384 --max-running-requests 8 --repeats 3 ${ENGINE_ARGS:-} \
  --output-json "$OUT/weights_8b.json" 2>&1 | tee "$OUT/weights_8b.log"
