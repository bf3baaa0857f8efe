#!/usr/bin/env bash
# Where a step program's start-up cost goes on an NVIDIA GPU (Llama-3.1-8B shape, random
# weights): the first $LIMIT programs of the precompile grid compiled on an empty cache under
# each XLA flag set, then loaded from the persistent cache; then the decode step's time under
# the flag sets that change code generation. Run from the repo root; output in $OUT.
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-6}
BASE=(--backend cuda --load-format dummy --model llama-3.1-8b --max-total-tokens 262144)
tmp=$(mktemp -d)
sed 's/scan_layers: false.*/scan_layers: true/' configs/cuda.yaml > "$tmp/scan.yaml"
precompile() {  # NAME CACHE [flags for XLA_FLAGS] [engine args...]
  local name=$1 cache=$2 flags=$3; shift 3
  echo "-- precompile $name ($flags)"
  XLA_FLAGS="$flags" python3 -m engine.cli precompile "${BASE[@]}" "$@" --limit "$LIMIT" \
    --cache-dir "$cache" 2>&1 | grep -E "^tokens=|programs:" | tee "$OUT/compile_$name.txt"
}
precompile cold "$tmp/a" ""
precompile warm "$tmp/a" ""
precompile noautotune "$tmp/b" "--xla_gpu_autotune_level=0"
precompile scan "$tmp/c" "" --config "$tmp/scan.yaml"
for v in default:"" noautotune:"--xla_gpu_autotune_level=0"; do
  name=${v%%:*}; flags=${v#*:}
  echo "-- latency $name ($flags)"
  ENGINE_CACHE_DIR="$tmp/lat_$name" XLA_FLAGS="$flags" python3 -m engine.cli bench latency \
    "${BASE[@]}" --batch-size 1 64 --input-len 1024 --output-len 16 2>&1 \
    | grep -vE "INFO|Warning|warn|deprecat" | tee "$OUT/latency_$name.txt" | tail -6
done
rm -rf "$tmp"
