"""Compare grammar libraries on one tokenizer: JSON-schema compile time and per-token mask time.

    python scripts/grammar_backends.py [TOKENIZER_DIR]   (default: the default model's)

Walks one valid JSON document (tokenized by the tokenizer) through a matcher of each library:
before every token, time the mask fill (one thread, one row), check the token is allowed,
then advance. Needs llguidance and xgrammar (xgrammar is no dependency of the engine).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                   "maxItems": 5},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "address"],
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.com", "role": "admin",
            "scores": [0.5, 0.25, 1],
            "address": {"street": "12 St James Square", "city": "London", "zip": "12345"},
            "tags": ["math", "engine", "poetry"]}
"""Valid for SCHEMA, keys in the schema's order (llguidance generates properties in order)."""
REPS = 20


def allowed(row: np.ndarray, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


def run_llguidance(tok, ids: list[int]) -> tuple[float, float, list[float]]:
    import llguidance
    import llguidance.numpy as lgnp

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=len(tok),
                                eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compiles, fills = [], []
    for _ in range(REPS):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, grammar)
        compiles.append(time.perf_counter() - t0)
        mask = lgnp.allocate_token_bitmask(1, len(tok))
        for t in ids:
            t0 = time.perf_counter()
            lgnp.fill_next_token_bitmask(m, mask, 0)
            fills.append(time.perf_counter() - t0)
            assert allowed(mask[0], t) and m.consume_token(t), m.get_error()
    return setup, statistics.median(compiles), fills


def run_xgrammar(tok, ids: list[int]) -> tuple[float, float, list[float]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    setup = time.perf_counter() - t0
    compiles, fills = [], []
    for _ in range(REPS):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=1)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        compiles.append(time.perf_counter() - t0)
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(tok))
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            fills.append(time.perf_counter() - t0)
            assert allowed(mask[0].numpy(), t) and m.accept_token(t)
    return setup, statistics.median(compiles), fills


def main() -> None:
    from transformers import AutoTokenizer

    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from engine.loader import hub
        from engine.loader.gguf import gguf_tokenizer_dir

        path = gguf_tokenizer_dir(hub.fetch_model(hub.DEFAULT_MODEL, progress=False),
                                  progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    print(f"vocab {len(tok)}, document {len(ids)} tokens, {REPS} passes")
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
        setup, compile_s, fills = fn(tok, ids)
        us = np.asarray(fills) * 1e6
        print(f"{name:>10}: tokenizer setup {setup:.2f} s, schema compile {compile_s * 1e3:.2f} "
              f"ms, mask/token mean {us.mean():.1f} us, median {np.median(us):.1f} us, "
              f"p99 {np.percentile(us, 99):.0f} us")


if __name__ == "__main__":
    main()
