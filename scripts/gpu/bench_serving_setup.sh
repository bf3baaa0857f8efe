#!/usr/bin/env bash
# Prepare .bench/ (git-ignored; it travels to the GPU machine only when carried) for
# scripts/gpu/serve.sh, on a host that reaches the package index:
#   .bench/bench_serving.py   SGLang's serving benchmark client, the single-file version of
#                             its sglang 0.5.2 wheel (it needs aiohttp, numpy, requests, tqdm
#                             and transformers, no sglang module); never committed
#   .bench/llama-3.1-8b/      the Llama-3.1-8B shape (config.json, for --load-format dummy)
#                             with the default model's tokenizer (49k tokens): both clients
#                             draw random token ids below its vocabulary
# Run from the repo root: scripts/gpu/bench_serving_setup.sh
set -euo pipefail
PY=${PYTHON:-python3}  # the engine's Python (e.g. .venv/bin/python)
mkdir -p .bench
if [[ ! -f .bench/bench_serving.py ]]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --no-deps --quiet -d "$tmp" "sglang==${SGLANG_VERSION:-0.5.2}"
  "$PY" - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(f"{sys.argv[1]}/sglang-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(".bench/bench_serving.py", "wb") as f:
    f.write(z.read("sglang/bench_serving.py"))
PY
  rm -rf "$tmp"
fi
"$PY" - <<'PY'
import json, shutil
from pathlib import Path
from engine.loader.load import load_checkpoint
from engine.model.presets import PRESETS

out = Path(".bench/llama-3.1-8b")
out.mkdir(parents=True, exist_ok=True)
cfg = dict(PRESETS["llama-3.1-8b"], architectures=["LlamaForCausalLM"])
(out / "config.json").write_text(json.dumps(cfg, indent=1))
tok = Path(load_checkpoint(None).tokenizer_path)  # the default model's tokenizer folder
for f in tok.iterdir():
    if f.is_file() and f.suffix in (".json", ".jinja", ".model", ".txt"):
        if f.name not in ("config.json", "engine_gguf_source.json"):
            shutil.copy(f, out / f.name)
print(f"{out}: {sorted(p.name for p in out.iterdir())}")
PY
grep -q '^/.bench/' .gitignore || echo "warning: .bench/ is not in .gitignore"
