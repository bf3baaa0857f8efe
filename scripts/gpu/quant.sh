#!/usr/bin/env bash
# GPU quantization measurements (issue 18), from the repo root on an NVIDIA GPU (H200).
# Results under $OUT (default ./.out/quant). Unmeasured durations; to stay under 10 minutes a
# call, run e.g. `tests gemm`, then `latency`, then `logits offline` as separate calls.
# Usage: scripts/gpu/quant.sh [STAGE...]   (default: tests gemm latency logits)
#   tests    the quantized-linear and fp8-KV kernel tests compiled by Triton on the GPU
#   gemm     the 8B GEMM shapes (wqkv, wo, gate/up, down, lm head) at M 16 / 1 / 8 / 32 / 64:
#            bf16, fp8 (weight-only, W8A8 ours and XLA's), int8, int4, many GEMMs per timed
#            program; weight GB/s and a sweep of the kernels' tiles/splits/warps/stages within
#            GEMM_BUDGET_S seconds (default 200); $OUT/quant_tuning_paste.txt holds the
#            winners as lines for backends/gpu/kernels/quant_tuning.py's TUNED
#   latency  Llama-3.1-8B shape, dummy weights: decode step at batch $BATCHES, ctx
#            $INPUT_LEN, for $SCHEMES (bf16 fp8 int8 int4; fp8kv: fp8 + fp8 KV) one after
#            another; a table of each step against bf16's
#   logits   8B-shape logits per scheme vs bf16 (relative error, top-1 agreement)
#   profile  the model's decode step alone per scheme of $SCHEMES at $PROBE_BATCHES (default
#            "1 64"), with GPU kernel time per step by kernel at $PROBE_PROFILE (default 1):
#            scripts/gpu/decode_fusions.py's "all" with PROBE_QUANT / PROBE_KV
#   offline  200 prompts x 1024 in / 1024 out: bf16 vs fp8 weights + fp8 KV (NUM_PROMPTS;
#            OFFLINE_SCHEMES, default "bf16 fp8kv"); each run's whole log in offline_S.log
# ENGINE_ARGS adds flags to every engine run (e.g. "--config cuda-h100").
set -uo pipefail
OUT=${OUT:-.out}/quant; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
MODEL=(--backend cuda --load-format dummy --model llama-3.1-8b ${ENGINE_ARGS:-})
BATCHES=${BATCHES:-1 64 256}
SCHEMES=${SCHEMES:-bf16 fp8 int8 int4}
quiet() { grep -v -E "INFO|Warning|warn|deprecat" ; }
flags() {  # a scheme's engine flags
  case $1 in
  bf16) ;;
  fp8kv) echo "--quantization fp8 --kv-cache-dtype fp8" ;;
  *) echo "--quantization $1" ;;
  esac
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import jax, triton; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for stage in "${@:-tests gemm latency logits}"; do for stage in $stage; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/backends/gpu 2>&1 | tee "$OUT/tests.txt" \
      | tail -5 ;;
  gemm)
    python3 scripts/gpu/quant_bench.py "$OUT" gemm --budget ${GEMM_BUDGET_S:-200} 2>&1 | quiet \
      | tee "$OUT/gemm.txt" | grep -E "^==|^ |^#|model|xla" ;;
  latency)
    for s in $SCHEMES; do
      echo "-- $s"
      python3 -m engine.cli bench latency "${MODEL[@]}" $(flags $s) --batch-size $BATCHES \
        --input-len ${INPUT_LEN:-1024} --output-len ${OUTPUT_LEN:-32} \
        --output-json "$OUT/latency_$s.json" 2>&1 | quiet | tee "$OUT/latency_$s.txt" | tail -5
    done
    python3 - "$OUT" $SCHEMES <<'PY' | tee "$OUT/latency_table.txt"
import json, sys
out, schemes = sys.argv[1], sys.argv[2:]
runs = {}
for s in schemes:
    try:
        runs[s] = {r["batch"]: r["decode_step_s"] for r in json.load(open(f"{out}/latency_{s}.json"))["rows"]}
    except (OSError, KeyError, ValueError) as e:
        print(f"{s}: no result ({type(e).__name__})")
base = runs.get("bf16", {})
for s, rows in runs.items():
    print(f"{s:<6} " + "  ".join(f"b{b} {t * 1e3:7.2f} ms" + (f" ({t / base[b]:.2f}x bf16)" if b in base else "")
                                for b, t in sorted(rows.items())))
PY
    ;;
  logits)
    python3 scripts/gpu/quant_bench.py "$OUT" logits 2>&1 | quiet | tee "$OUT/logits.txt" ;;
  profile)
    for s in $SCHEMES; do
      echo "-- $s $(date -u +%H:%M:%S)"
      q=$s; kv=
      case $s in bf16) q= ;; fp8kv) q=fp8; kv=fp8 ;; esac
      PROBE_QUANT=$q PROBE_KV=$kv PROBE_TAG="-$s" python3 scripts/gpu/decode_fusions.py "$OUT" \
        all 2>&1 | quiet | tail -45
    done ;;
  offline)
    for s in ${OFFLINE_SCHEMES:-bf16 fp8kv}; do
      echo "-- $s $(date -u +%H:%M:%S)"
      python3 -m engine.cli bench offline "${MODEL[@]}" $(flags $s) --dataset random \
        --num-prompts ${NUM_PROMPTS:-200} --random-input-len 1024 --random-output-len 1024 \
        --random-range-ratio 1.0 --warmup-runs 0 --output-json "$OUT/offline_$s.json" 2>&1 \
        | tee "$OUT/offline_$s.log" | quiet | tee "$OUT/offline_$s.txt" | tail -25
    done ;;
  *) echo "unknown stage $stage" ;;
  esac
done; done
