#!/usr/bin/env bash
# Orbax restore vs safetensors load on one GPU (issue 23, part 1), from the repo root.
# Llama-3.1-8B shape in bfloat16 (SHAPE to change it): random safetensors written as an HF
# folder (scripts/gpu/random_safetensors.py), the same shape from --load-format dummy
# converted to orbax (engine convert), then `engine bench load` times both loads onto the
# device (q/k/v fused, ready to serve) REPEAT times. Needs about 2 x 16 GB of disk under
# WORK (removed at the end) and orbax-checkpoint (in the cuda image; else carry its wheels
# in .whl/). About 3 minutes. Results in $OUT/orbax_*.
set -uo pipefail
OUT=${OUT:-.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export ENGINE_CACHE_DIR=${ENGINE_CACHE_DIR:-/tmp/engine-cache}
SHAPE=${SHAPE:-llama-3.1-8b}; BACKEND=${BACKEND:-cuda}; WORK=${WORK:-$(mktemp -d)}
if [[ -d .whl && ! -f /tmp/site/.done ]]; then  # .whl/ travels only when the call carries it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
[[ -d /tmp/site ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site
python3 -c "import orbax.checkpoint as o, tensorstore; print('orbax-checkpoint', o.__version__)" \
  || { echo "orbax-checkpoint is missing"; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK"; df -h "$WORK" | tail -1
echo "== safetensors $(date -u +%H:%M:%S)"
python3 scripts/gpu/random_safetensors.py "$SHAPE" "$WORK/hf" | tee "$OUT/orbax_write.txt"
echo "== convert $(date -u +%H:%M:%S)"
t0=$(date +%s)
python3 -m engine.cli convert "$SHAPE" "$WORK/orbax" --backend "$BACKEND" --load-format dummy \
  > "$OUT/orbax_convert.log" 2>&1 || { tail -5 "$OUT/orbax_convert.log"; exit 1; }
echo "converted in $(($(date +%s) - t0)) s: $(du -sh "$WORK/orbax" | cut -f1)" \
  | tee -a "$OUT/orbax_write.txt"
echo "== load $(date -u +%H:%M:%S)"
python3 -m engine.cli bench load --backend "$BACKEND" --model "$WORK/hf" --orbax "$WORK/orbax" \
  --repeat "${REPEAT:-2}" --output-json "$OUT/orbax_load.json" > "$OUT/orbax_load.log" 2>&1 \
  || { echo "bench load failed:"; tail -5 "$OUT/orbax_load.log"; }
grep -E "orbax restore [0-9]+/" "$OUT/orbax_load.log" | tail -2
grep -A4 "^checkpoint" "$OUT/orbax_load.log" | tee "$OUT/orbax_load.txt"
rm -rf "$WORK"
