#!/usr/bin/env bash
# Serving on an NVIDIA GPU without compile stalls (issue #20), from the repo root, results in
# $OUT (default .out): `engine serve --backend cuda` with the preset's defaults (every step
# program compiled before /health turns 200), Llama-3.1-8B shape, random weights,
# --max-model-len 8192.
#   1. cold start: an empty compilation cache -> seconds to ready, warm-up lines
#   2. warm start: the cache the cold start filled -> seconds to ready; this server stays up
#   3. the same workload from both clients, one after the other: `engine bench serving`, then
#      SGLang's own bench_serving.py (--backend sglang --dataset-name random-ids), $NUM_PROMPTS
#      prompts of $IN +-50% tokens in, $OUTPUT +-50% out, at each rate of $RATES
#      (bench_serving.py only; ours at the first). Ours sends token ids; bench_serving.py
#      sends its random ids decoded to text (as against an SGLang server), which the server
#      tokenizes again: its prompts' lengths differ a little (its --tokenize-prompt would send
#      ids, but its 0.5.2 version fails to serialize them: numpy int64)
#   4. compilations after ready (/metrics engine:step_compilations_total and the log's
#      "while serving" warnings), and a summary: each start's phases (imports, weights,
#      activation probe, KV pool, warm-up, engine, server; the log's "start-up:" line) and
#      a table of both clients' figures: summary.txt
# Needs .bench/ (scripts/gpu/bench_serving_setup.sh on a host with the package index; carry
# it): bench_serving.py and the 8B shape's folder with a 49k-token tokenizer. GPU time:
# about 6 minutes (two starts, three 400-prompt runs).
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
[[ -d /tmp/site ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site  # wheels from cuda_suite.sh
MODEL_DIR=${MODEL_DIR:-.bench/llama-3.1-8b}
BENCH=${BENCH:-.bench/bench_serving.py}
PORT=${PORT:-30000}
NUM_PROMPTS=${NUM_PROMPTS:-400}; IN=${IN:-1024}; OUTPUT=${OUTPUT:-512}; RATES=${RATES-inf 8}  # RATES="": our client only
ARGS=(--backend "${BACKEND:-cuda}" --model "$MODEL_DIR" --load-format dummy --max-model-len 8192
      --port "$PORT" ${ENGINE_ARGS:-})
for f in "$MODEL_DIR/config.json" "$MODEL_DIR/tokenizer.json" "$BENCH"; do
  [[ -f $f ]] || { echo "missing $f: run scripts/gpu/bench_serving_setup.sh and carry .bench"; exit 1; }
done
CACHE=$(mktemp -d)  # this run's compilation cache: empty for the cold start
export ENGINE_CACHE_DIR=$CACHE
pid=

start() {  # NAME: engine serve until /health is 200; prints the seconds
  local name=$1 t0; t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m engine.cli serve "${ARGS[@]}" \
    > "$OUT/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq ${READY_WAIT:-480}); do
    curl -sf "localhost:$PORT/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "$name: serve exited"; tail -20 "$OUT/$name.log"; exit 1; }
    sleep 0.5
  done
  local s; s=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  echo "$name start to ready: $s s; $(grep -oE 'warm-up: [0-9]+ programs in [0-9.]+s( \([^)]*\))?' \
    "$OUT/$name.log"); $(grep -oE 'activation peak .*' "$OUT/$name.log" | head -1)" \
    | tee -a "$OUT/summary.txt"
  # the server's own clock, phase by phase (engine/startup.py): imports, weights, probe, ...
  echo "$name $(grep -oE 'start-up: [0-9.]+s to ready .*' "$OUT/$name.log" | tail -1);" \
    "$(grep -oE 'tokenizer loaded in [0-9.]+s' "$OUT/$name.log" | head -1)" \
    | tee -a "$OUT/summary.txt"
}
stop() { kill -TERM $pid; wait $pid; pid=; }
compiles() {  # LABEL: compilations counted by the server, and its warnings
  echo "$1: $(curl -s "localhost:$PORT/metrics" | grep -E '^engine:step_compilations_total') ;" \
    "'while serving' log lines: $(grep -c 'while serving' "$OUT/warm.log")" \
    | tee -a "$OUT/summary.txt"
}
trap '[[ -n $pid ]] && kill -TERM $pid; rm -rf "$CACHE"' EXIT

echo "== $(date -u +%H:%M:%S) cold and warm start" | tee "$OUT/summary.txt"
start cold; stop
start warm
compiles "after ready"
grep -E "warm-up [0-9]+/" "$OUT/cold.log" | tail -3

RATE0=${RATES%% *}; RATE0=${RATE0:-inf}
# Each client's own CPU time (one Python process: a client near a whole core is the limit)
TIMEFORMAT="client CPU: user %U s + sys %S s, wall %R s"
echo "== $(date -u +%H:%M:%S) engine bench serving, rate $RATE0"
{ time python3 -m engine.cli bench serving --port "$PORT" --dataset random \
  --num-prompts "$NUM_PROMPTS" --random-input-len "$IN" --random-output-len "$OUTPUT" \
  --random-range-ratio 0.5 --request-rate "$RATE0" --vocab-size 49152 \
  --output-json "$OUT/engine_bench.json" 2>&1 | grep -v -E "INFO|Warning|warn" \
  | tee "$OUT/engine_bench.txt" | tail -30; } 2> >(sed 's/^/engine bench serving /' >> "$OUT/summary.txt")
compiles "after engine bench serving"

for rate in $RATES; do
  echo "== $(date -u +%H:%M:%S) SGLang bench_serving.py, rate $rate"
  { time python3 "$BENCH" --backend sglang --port "$PORT" --model "$MODEL_DIR" \
    --tokenizer "$MODEL_DIR" --dataset-name random-ids \
    --num-prompts "$NUM_PROMPTS" --random-input-len "$IN" --random-output-len "$OUTPUT" \
    --random-range-ratio 0.5 --request-rate "$rate" --disable-tqdm \
    --output-file "$OUT/sglang_bench_rate$rate.jsonl" 2>&1 | tee "$OUT/sglang_bench_rate$rate.txt" \
    | sed -n '/Serving Benchmark Result/,/^=\+$/p'; } \
    2> >(sed "s/^/bench_serving.py rate $rate /" >> "$OUT/summary.txt")
  compiles "after bench_serving.py rate $rate"
done
stop
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'client':<28}{'out tok/s':>10}{'TTFT med':>10}{'TTFT p99':>10}{'ITL med':>9}"
      f"{'ITL p99':>9}{'ITL max':>9}  (ms)")
e = json.loads((out / "engine_bench.json").read_text())
print(f"{'engine bench serving':<28}{e['output_throughput']:>10.0f}"
      f"{e['ttft_ms']['median']:>10.0f}{e['ttft_ms']['p99']:>10.0f}"
      f"{e['itl_ms']['median']:>9.1f}{e['itl_ms']['p99']:>9.1f}{e['itl_ms']['max']:>9.0f}")
for f in sorted(out.glob("sglang_bench_rate*.jsonl")):
    s = json.loads(f.read_text().splitlines()[-1])
    text = f.with_suffix(".txt").read_text()
    mx = re.search(r"Max ITL \(ms\):\s+([\d.]+)", text)
    print(f"{'bench_serving.py ' + f.stem.split('_')[-1]:<28}{s['output_throughput']:>10.0f}"
          f"{s['median_ttft_ms']:>10.0f}{s['p99_ttft_ms']:>10.0f}{s['median_itl_ms']:>9.1f}"
          f"{s['p99_itl_ms']:>9.1f}{float(mx.group(1)) if mx else float('nan'):>9.0f}")
PY
