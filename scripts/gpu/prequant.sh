#!/usr/bin/env bash
# Pre-quantized checkpoints and quantized weights under tensor parallelism, compiled on
# NVIDIA GPUs (CI checks the same on the CPU). Run from the repo root; results in $OUT.
# Usage: scripts/gpu/prequant.sh STAGE...
#   tests  tests/models/test_prequant.py with the GPU as JAX's default device: AWQ, GPTQ,
#          compressed-tensors FP8/INT8 and block-scaled FP8 tiny checkpoints (and FP8 MoE
#          experts) give the logits of their dequantized float models
#   tp     the CUDA backend at TP 1 and 2 (needs 2 GPUs): a tiny model quantized int8 at
#          load and a tiny AWQ checkpoint; prints whether TP 2's greedy tokens equal TP 1's
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
work=$(mktemp -d)
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/models/test_prequant.py 2>&1 \
      | tee "$OUT/prequant_tests.txt" | tail -3 ;;
  tp)
    python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
from tests.models.prequant_checkpoints import write_checkpoint
from tests.parallel.test_tensor_parallel import TINY_QUANT
work = Path(sys.argv[1])
(work / "int8").mkdir()
(work / "int8" / "config.json").write_text(json.dumps(TINY_QUANT))
write_checkpoint(work / "awq", "awq", config=TINY_QUANT)
PY
    for run in "int8 $work/int8/config.json dummy int8" "awq $work/awq auto "; do
      read -r name model format quant <<< "$run"
      ENGINE_TEST_BACKEND=cuda ENGINE_TEST_QUANT=$quant python3 -m tests.parallel.tp_worker \
        "$model" "$format" 1 2 2> "$OUT/tp_$name.log" | grep '^{' > "$OUT/tp_$name.jsonl"
      python3 -c "
import json, sys
rows = {r['tp']: r for r in map(json.loads, open(sys.argv[1]))}
same = rows[2]['tokens'] == rows[1]['tokens']
gap = max(abs(a - b) for x, y in zip(rows[2]['logprobs'], rows[1]['logprobs'])
          for a, b in zip(x, y))
print(f'$name: TP 2 tokens equal TP 1: {same}; max logprob gap {gap:.2e}')
" "$OUT/tp_$name.jsonl" | tee -a "$OUT/prequant_tp.txt"
    done ;;
  *) echo "unknown stage $stage" ;;
  esac
done
rm -rf "$work"
