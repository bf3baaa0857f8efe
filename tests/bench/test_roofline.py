"""The roofline the benchmarks measure against: bytes and FLOPs per step, the runner's step
log they are computed from, and `engine bench latency`'s rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from engine.bench.hostload import BUSY_LOAD
from engine.bench.roofline import ModelCost, StepWork
from engine.cli import main
from engine.llm import LLM
from engine.model.presets import preset_config
from engine.model.weights import random_params
from engine.sampling_params import SamplingParams
from tests.bench.test_offline_bench import TINY


def test_8b_shape_reads_its_weights_but_not_its_embedding_table():
    cfg = preset_config("llama-3.1-8b")
    params = jax.eval_shape(lambda: random_params(cfg, jnp.bfloat16, scan=False))
    cost = ModelCost.of(cfg, params, kv_itemsize=2)
    e, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    per_layer = (e * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                 + cfg.num_heads * cfg.head_dim * e + 3 * e * cfg.intermediate_size + 2 * e)
    assert cost.layer_params == L * per_layer
    assert cost.weight_bytes == 2 * (L * per_layer + e + e * v)  # layers, norm, LM head
    assert cost.weight_bytes == pytest.approx(15.01e9, rel=1e-3)  # 16.06 GB less the table
    assert cost.kv_bytes_per_token == 128 * 1024  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    bw, rate = 4e12, 800e12
    decode = StepWork(True, tokens=1, logit_rows=1, context_tokens=1024, attention_pairs=1024,
                      seconds=0.0)
    assert cost.step_bound(decode, bw, rate) == pytest.approx(
        (cost.weight_bytes + e * 2 + 1024 * cost.kv_bytes_per_token) / bw)  # memory-bound
    prefill = StepWork(False, tokens=8192, logit_rows=1, context_tokens=8192,
                       attention_pairs=8192 * 8193 // 2, seconds=0.0)
    flops = cost.step_flops(8192, 1, 8192 * 8193 // 2)
    assert flops == pytest.approx(132e12, rel=0.03)  # the count in docs/benchmarks.md
    assert cost.step_bound(prefill, bw, rate) == pytest.approx(flops / rate)  # compute-bound
    assert cost.step_bound(prefill, bw, rate, devices=2) == pytest.approx(flops / rate / 2)


def test_runner_logs_each_steps_tokens_context_and_causal_pairs(tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=1024)
    runner = llm.engine.runner
    runner.step_log = []
    llm.generate([list(range(1, 11))], SamplingParams(max_tokens=3, temperature=0.0,
                                                       ignore_eos=True))
    log = [StepWork(*fields) for fields in runner.step_log]
    # A 10-token prompt (10 x 11 / 2 causal pairs), then two decodes at contexts 11 and 12.
    assert [(w.decode_only, w.tokens, w.logit_rows, w.context_tokens, w.attention_pairs)
            for w in log] == [(False, 10, 1, 10, 55), (True, 1, 1, 11, 11), (True, 1, 1, 12, 12)]
    assert all(w.seconds > 0 for w in log)


def test_latency_rows_carry_the_roofline_and_the_hf_baseline(tmp_path: Path, capsys):
    """(The HF baseline rides on this run: one engine build for both; see
    tests/bench/test_latency_baselines.py for the rest of --baseline.)"""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--backend", "cpu", "--load-format", "dummy", "--model",
                 str(config), "--batch-size", "1", "2", "--input-len", "16", "--output-len", "4",
                 "--baseline", "hf", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["copy_bandwidth"] > 0
    one, two = data["rows"]
    assert two["weight_bytes"] - one["weight_bytes"] == TINY["hidden_size"] * 4  # a row more
    assert two["kv_bytes_read"] == 2 * one["kv_bytes_read"] > 0
    assert 0 < one["roofline_s"] and 0 < one["decode_step_s"]
    printed = capsys.readouterr().out
    assert "x roofline" in printed
    # The same batches through HF generate, each compared with the engine's row.
    base = data["baseline_rows"]
    assert [(r["name"], r["batch"], r["input_len"]) for r in base] == [
        ("hf transformers", 1, 16), ("hf transformers", 2, 16)]
    assert all(r["prefill_s"] > 0 and r["decode_step_s"] > 0 for r in base)
    lines = [ln for ln in printed.splitlines() if "engine / hf transformers" in ln]
    assert len(lines) == 2 and "batch   1" in lines[0] and "batch   2" in lines[1]
    load = data["host_load"]  # read around the run, flagged on a loaded host
    assert load["load_before"] >= 0 and load["load_after"] >= 0
    assert load["busy_host"] == (load["load_before"] > BUSY_LOAD)
    assert "load average before" in printed and "load average after" in printed


def test_a_mixture_of_experts_token_multiplies_k_of_x_experts():
    cfg = preset_config("llama-3.1-8b")
    moe = dataclasses.replace(cfg, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=1024)
    dense = ModelCost.of(cfg, jax.eval_shape(lambda: random_params(cfg, jnp.bfloat16,
                                                                    scan=True)), 2)
    sparse = ModelCost.of(moe, jax.eval_shape(lambda: random_params(moe, jnp.bfloat16,
                                                                     scan=True)), 2)
    e, L = cfg.hidden_size, cfg.num_layers
    mlp = 3 * e * cfg.intermediate_size
    router, experts = e * 8, 8 * 3 * e * 1024
    assert sparse.layer_params == dense.layer_params - L * mlp + L * (router + experts // 4)
    assert sparse.weight_bytes == dense.weight_bytes + 2 * L * (router + experts - mlp)
