#!/usr/bin/env bash
# Batch-1 decode fusions on an NVIDIA GPU (issue 20, item 3), from the repo root, in one call
# (about 3-4 minutes): the Llama-3.1-8B-shape decode step (bf16, dummy weights, ctx 1024) at
# batch 1 and 64 with gate/up fusion, the one-kernel K/V write and the fused add+RMSNorm off
# (base), each alone and all on, against the copy-bandwidth roofline, with the per-kernel
# profile of "all" at batch 1 (scripts/gpu/decode_fusions.py); then "all" at batch 1 under
# XLA flag sets, one process each (a flag this XLA does not know fails only its own line):
#   nocmdbuf  --xla_gpu_enable_command_buffer=   (CUDA graphs off; recent XLA records
#             fusions, cuBLAS(Lt), custom calls and cuDNN into graphs by default)
#   cbprof    --xla_enable_command_buffers_during_profiling=true (the profile with graphs:
#             XLA turns them off while profiling by default, so a profile shows every launch)
#   cublas    --xla_gpu_enable_triton_gemm=false  (cuBLAS for every GEMM)
# Results under $OUT (default ./.out/fusions): fusions.txt, fusions-FLAGSET.txt, and json.
set -uo pipefail
OUT=${OUT:-.out}/fusions; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep -v -E "INFO|Warning|warn|deprecat" ; }
echo "== variants $(date -u +%H:%M:%S)"
python3 scripts/gpu/decode_fusions.py "$OUT" 2>&1 | quiet | tail -60
declare -A FLAGS=(
  [nocmdbuf]="--xla_gpu_enable_command_buffer="
  [cbprof]="--xla_enable_command_buffers_during_profiling=true"
  [cublas]="--xla_gpu_enable_triton_gemm=false"
)
for tag in nocmdbuf cbprof cublas; do
  echo "== $tag (${FLAGS[$tag]}) $(date -u +%H:%M:%S)"
  XLA_FLAGS="${XLA_FLAGS:-} ${FLAGS[$tag]}" PROBE_TAG="-$tag" PROBE_BATCHES=1 \
    python3 scripts/gpu/decode_fusions.py "$OUT" all 2>&1 | quiet | tail -40 \
    || echo "$tag failed"
done
echo "== done $(date -u +%H:%M:%S)"
