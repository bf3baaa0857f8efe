"""`engine bench offline` on a tiny random config: the engine's run and the HF baseline."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli import main

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False}


def test_engine_and_hf_baseline_generate_every_token(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", "--backend", "cpu", "--load-format", "dummy",
                 "--model", str(config), "--dataset", "random", "--num-prompts", "6",
                 "--random-input-len", "24", "--random-output-len", "5",
                 "--random-range-ratio", "0.5", "--warmup-runs", "0", "--baseline", "hf",
                 "--hf-num-prompts", "6", "--hf-batch-size", "3", "--overlap-schedule",
                 "--output-json", str(out)]) == 0
    engine, hf = json.loads(out.read_text())["results"]
    assert engine["name"] == "engine" and hf["name"].startswith("hf transformers")
    # Both ran the same six requests to their full lengths (ignore_eos / min_new_tokens).
    assert engine["requests"] == hf["requests"] == 6
    assert engine["input_tokens"] == hf["input_tokens"]
    assert engine["output_tokens"] == hf["output_tokens"] >= 6
    assert engine["steps"] >= 5 and engine["compiles"] >= 1 and engine["compile_s"] > 0
    # Every step is timed as decode-only or with prompt tokens, within the run's duration.
    (n_dec, s_dec), (n_prompt, s_prompt) = engine["step_time"]["decode"], \
        engine["step_time"]["prompt"]
    # (with overlap, a last step can still be in flight when the run's requests are done)
    assert engine["steps"] - 1 <= n_dec + n_prompt <= engine["steps"]
    assert n_dec >= 3 and n_prompt >= 1
    # Compilation (most of this cold run) is not counted in the step times (0.1 s of slack
    # for small helpers compiled while a step is in flight).
    assert 0 < s_dec + s_prompt <= engine["elapsed_s"] - engine["compile_s"] + 0.1
    # ... and its roofline, from the copy bandwidth and matmul rate measured before the run.
    assert engine["bound_s"]["decode"] > 0 and engine["bound_s"]["prompt"] > 0
    printed = capsys.readouterr().out
    assert printed.count("Offline Benchmark Result") == 2 and "Compile time in the run" in printed
    assert "Decode-only steps: n, s, mean ms" in printed and "x roofline" in printed
    assert "Run time / roofline" in printed
