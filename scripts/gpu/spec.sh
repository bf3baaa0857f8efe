#!/usr/bin/env bash
# Speculative decoding on an NVIDIA GPU, Llama-3.1-8B shape with random weights
# (--load-format dummy), batch 1, 4 draft tokens: `engine bench spec` runs speculation off
# and on side by side in one engine for each proposer below. Run from the repo root;
# results (text and JSON) in $OUT. About 4 minutes on an H200, most of it compilation.
#   same    draft = the target's own weights (the same preset and seed): every draft is
#           accepted; `bound tok/s` (tokens per step over the target's step time alone) is
#           the UPPER BOUND of the mechanism, not a real draft's speed-up
#   small   draft = a random Llama-3.2-1B (same vocabulary): drafts are rejected, so
#           `on tok/s` against `off tok/s` is the overhead floor
#   ngram   prompt lookup on the repetitive workload (random weights: acceptance is whatever
#           the random model's loops give)
#   same-unrolled, same-kvxla (not run by default) the same-weights run with the backend
#           option draft_unroll (the draft program's k - 1 decode steps unrolled: no XLA while
#           loop) or kv_write xla (K/V written by XLA's scatters, not the aliased Pallas
#           kernel): the A/B of why four 8B forwards in one program took 40 ms (2026-12-04)
#   same-ragged (not run by default: RUNS="same same-ragged") the same-weights run with the
#           backend option verify_decode off: the verify step's decode-and-drafts rows take
#           the ragged prefill kernel, as before 2026-12-03, instead of the decode kernel a
#           row per token; the A/B of that attention path
# The draft model's k proposals are one program a step (engine.spec.draft_step): `draft ms`
# is that program's dispatch and fetch; the verify step fetches token ids only.
#   eagle   a random EAGLE-3 head of the target's sizes (for Llama-3.1-8B: its layer, a
#           32k draft vocabulary; config.json written to $OUT/eagle3-head): drafts are
#           rejected, so `on tok/s` against `off tok/s` is the OVERHEAD FLOOR of EAGLE-3
#           (head steps, feature capture), not its speed-up. Both columns run with the
#           target capturing its three layers' features (one engine). Since 2026-12-04 its
#           k drafts are one program too (engine.spec.eagle_runner.EagleChain; the backend
#           option draft_unroll unrolls its loop): 6.92 ms of `draft ms` before, under 2
#           expected.
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
# A fixed KV pool (64k tokens, 8.6 GB) for the target, so the draft's weights and its pool
# of as many pages fit beside it.
# BACKEND, TARGET, SMALL_DRAFT: for a dry run elsewhere (BACKEND=cpu TARGET=smollm2-135m
# SMALL_DRAFT=smollm2-135m OUTPUT_LEN=8); TARGET must be a preset (the eagle run sizes its
# head from it).
TARGET=${TARGET:-llama-3.1-8b}
BASE=(--backend ${BACKEND:-cuda} --load-format dummy --model $TARGET --max-total-tokens 65536
      --speculative-num-draft-tokens ${K:-4} --batch-size ${BATCHES:-1}
      --output-len ${OUTPUT_LEN:-64} ${ENGINE_ARGS:-})
quiet() { grep -v -E "INFO|Warning|warn|deprecat" ; }
for run in ${RUNS:-same small ngram eagle}; do
  case $run in
  same)  args=(--speculative-algorithm draft --speculative-draft-model $TARGET) ;;
  small) args=(--speculative-algorithm draft --speculative-draft-model ${SMALL_DRAFT:-llama-3.2-1b}) ;;
  ngram) args=(--speculative-algorithm ngram) ;;
  same-ragged|same-unrolled|same-kvxla)
    case $run in
    same-ragged) option="verify_decode: false" ;;
    same-unrolled) option="draft_unroll: true" ;;
    same-kvxla) option="kv_write: xla" ;;
    esac
    python3 -c "import sys, yaml; d = yaml.safe_load(open('configs/cuda.yaml'))
d['backend'].update(yaml.safe_load(sys.argv[2])); yaml.safe_dump(d, open(sys.argv[1], 'w'))" \
      "$OUT/cuda-$run.yaml" "$option"
    args=(--config "$OUT/cuda-$run.yaml" --speculative-algorithm draft
          --speculative-draft-model $TARGET) ;;
  eagle) head="$OUT/eagle3-head"; mkdir -p "$head"
         python3 -c "import json, sys; from engine.model.presets import PRESETS; \
from engine.spec.eagle_head import head_config_like; \
json.dump(head_config_like(PRESETS[sys.argv[1]]), open(sys.argv[2], 'w'), indent=1)" \
           "$TARGET" "$head/config.json" || continue
         args=(--speculative-algorithm eagle --speculative-draft-model "$head") ;;
  esac
  echo "== $run $(date -u +%H:%M:%S)"
  timeout ${TIMEOUT:-170} python3 -m engine.cli bench spec "${BASE[@]}" "${args[@]}" \
    --output-json "$OUT/spec_$run.json" 2>&1 | quiet | tee "$OUT/spec_$run.txt" | tail -3
done
