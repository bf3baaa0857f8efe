#!/usr/bin/env bash
# Safetensors load alone on one GPU (issue 20, goal: at least 2 GB/s for the 8B shape; the
# 2026-12-03 figure before the memory-mapped loader was 0.26 GB/s, 62.3 s). Run from the
# repo root. Llama-3.1-8B shape in bfloat16 (SHAPE to change it): random safetensors
# written as an HF folder (scripts/gpu/random_safetensors.py, about 16 GB under WORK,
# removed at the end), then `engine bench load --source-only` times the load onto the
# device (q/k/v fused, ready to serve) REPEAT times and prints GB/s. About 2 minutes.
# Results under $OUT (or ./.out): st_load.json / .log, st_write.txt.
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
SHAPE=${SHAPE:-llama-3.1-8b}; BACKEND=${BACKEND:-cuda}; WORK=${WORK:-$(mktemp -d)}
rm -rf "$WORK"; mkdir -p "$WORK"; df -h "$WORK" | tail -1
echo "== safetensors $(date -u +%H:%M:%S)"
python3 scripts/gpu/random_safetensors.py "$SHAPE" "$WORK/hf" | tee "$OUT/st_write.txt"
echo "== load $(date -u +%H:%M:%S)"
python3 -m engine.cli bench load --backend "$BACKEND" --model "$WORK/hf" --source-only \
  --repeat "${REPEAT:-3}" --output-json "$OUT/st_load.json" ${ENGINE_ARGS:-} \
  > "$OUT/st_load.log" 2>&1 || { echo "bench load failed:"; tail -5 "$OUT/st_load.log"; }
grep "^source load" "$OUT/st_load.log" | tee -a "$OUT/st_write.txt"
rm -rf "$WORK"
