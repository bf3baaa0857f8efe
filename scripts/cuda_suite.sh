#!/usr/bin/env bash
# Run on an NVIDIA GPU machine from the repo root. Results go to $OUT (or ./.out).
# Usage: scripts/cuda_suite.sh STAGE...   (stages run in order; each prints a short table)
#   tests      CUDA + CPU kernel tests on the GPU
#   latency    decode step vs roofline, Llama-3.1-8B shape, batches $BATCHES at ctx $INPUT_LEN
#   prefill    one 8k-token prompt through the whole model (prefill time, tok/s, TFLOP/s)
#   offline    1000 random prompts 1024 in / 1024 out; HF generate on $HF_PROMPTS of them
#   serve      engine serve --backend cuda (WARMUP=N: --warmup-decode-len N; WARMUP_PROMPTS=1:
#              --warmup-prompt-steps too), one curl
#              completion, engine bench serving
#   stalls     scripts/gpu/serve.sh: cold and warm start to ready with the preset's full
#              warm-up, compilations after ready, SGLang's bench_serving.py next to engine
#              bench serving (needs .bench/ carried: scripts/gpu/bench_serving_setup.sh)
#   shared     generated-shared-prefix workload offline, radix cache on vs off
#   vs_hf      8B-shape logits vs HF transformers in float32 (scripts/cuda_vs_hf.py)
#   tp         decode latency at TP $TP_SIZES (needs that many GPUs)
# Wheels the image lacks (fastapi, uvicorn, pydantic, ...) are installed from
# .whl/ when present (see the device notes in docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
MODEL=(--backend cuda --load-format dummy --model llama-3.1-8b ${ENGINE_ARGS:-})  # ENGINE_ARGS: more flags
BATCHES=${BATCHES:-1 8 32 128 256}
TP_SIZES=${TP_SIZES:-2 4}
quiet() { grep -v -E "INFO|Warning|warn|deprecat" ; }
if [[ -d .whl && ! -f /tmp/site/.done ]]; then  # .whl/ travels only when the call carries it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
[[ -d /tmp/site ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
head -3 "$OUT/gpu.txt"
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/backends/cuda tests/backends/cpu 2>&1 \
      | tee "$OUT/tests.txt" | tail -3 ;;
  latency)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli bench latency "${MODEL[@]}" \
      --batch-size $BATCHES --input-len ${INPUT_LEN:-1024} --output-len ${OUTPUT_LEN:-32} \
      --output-json "$OUT/latency.json" 2>&1 | quiet | tee "$OUT/latency.txt" ;;
  prefill)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli bench latency "${MODEL[@]}" \
      --batch-size 1 --input-len 8192 --output-len 8 --chunked-prefill-size 8192 \
      --output-json "$OUT/prefill8k.json" 2>&1 | quiet | tee "$OUT/prefill8k.txt" ;;
  offline)  # a second `offline` (a warm compilation cache) writes offline2.*
    runs=$((${runs:-0} + 1)); name=offline$([[ $runs -gt 1 ]] && echo $runs)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli bench offline "${MODEL[@]}" \
      --dataset random --num-prompts ${NUM_PROMPTS:-1000} --random-input-len 1024 \
      --random-output-len 1024 --random-range-ratio 1.0 --warmup-runs 0 \
      ${HF_PROMPTS:+--baseline hf --hf-num-prompts $HF_PROMPTS --hf-batch-size ${HF_BATCH:-64}} \
      --output-json "$OUT/$name.json" 2>&1 | quiet | tee "$OUT/$name.txt" | tail -40 ;;
  serve)  # a second `serve` (a warm compilation cache) writes serve2.*
    serves=$((${serves:-0} + 1)); name=serve$([[ $serves -gt 1 ]] && echo $serves)
    t0=$(date +%s)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli serve "${MODEL[@]}" --port 30000 \
      ${WARMUP:+--warmup-decode-len $WARMUP} ${WARMUP_PROMPTS:+--warmup-prompt-steps} \
      > "$OUT/$name.log" 2>&1 &
    pid=$!
    for _ in $(seq ${READY_WAIT:-300}); do
      curl -sf localhost:30000/health >/dev/null && break
      kill -0 $pid 2>/dev/null || { echo "serve exited:"; tail -5 "$OUT/$name.log"; break; }
      sleep 1
    done
    echo "$name: ready after $(($(date +%s) - t0)) s; $(grep -c 'warm-up' "$OUT/$name.log") warm-up programs"
    curl -s localhost:30000/v1/completions -H 'content-type: application/json' \
      -d '{"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 8, "temperature": 0}' \
      | tee "$OUT/serve_curl.json"; echo
    [[ -f engine/bench/serving.py ]] && python3 -m engine.cli bench serving --port 30000 --dataset random \
      --num-prompts ${SERVE_PROMPTS:-200} --random-input-len ${SERVE_IN:-1024} \
      --random-output-len ${SERVE_OUTPUT:-256} --random-range-ratio 0.5 \
      --request-rate ${RATE:-inf} --vocab-size 128256 --output-json "$OUT/$name.json" \
      2>&1 | quiet | tee "$OUT/$name.txt" | tail -30
    curl -s localhost:30000/metrics | grep -E "^engine:step_compilations_total"
    grep -E "while serving" "$OUT/$name.log" | tail -3
    kill -TERM $pid; wait $pid; echo "serve exit $?" ;;
  stalls)
    OUT="$OUT/stalls" scripts/gpu/serve.sh ;;
  shared)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli bench offline "${MODEL[@]}" \
      --max-total-tokens 300000 --dataset generated-shared-prefix --gsp-num-groups 8 \
      --gsp-prompts-per-group 32 --gsp-system-prompt-len 2048 --gsp-question-len 128 \
      --gsp-output-len 256 --compare-cache-off --warmup-runs 1 \
      --output-json "$OUT/shared.json" 2>&1 | quiet | tee "$OUT/shared.txt" | tail -45 ;;
  vs_hf)
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 scripts/cuda_vs_hf.py llama-3.1-8b 32 256 2>&1 \
      | quiet | tee "$OUT/vs_hf.txt" | tail -4 ;;
  tp)
    for tp in $TP_SIZES; do
      python3 -m engine.cli bench latency "${MODEL[@]}" --tp $tp --batch-size 1 32 128 \
        --input-len 1024 --output-len 32 --output-json "$OUT/latency_tp$tp.json" 2>&1 \
        | quiet | tee "$OUT/latency_tp$tp.txt"
    done ;;
  *) echo "unknown stage $stage" ;;
  esac
done
