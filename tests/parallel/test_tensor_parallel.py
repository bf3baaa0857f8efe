"""Tensor parallelism on 8 forced CPU devices: TP 2, 4 and 8 give TP 1's greedy tokens.

Each case runs in a subprocess, because the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
"""8 query heads, 2 KV heads: TP 2 shards the KV cache, TP 4 and 8 replicate it."""


TINY_MOE = {**TINY, "model_type": "qwen3_moe", "head_dim": 16, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
"""8 experts, 2 per token: expert parallelism puts 4, 2 or 1 whole experts on a device."""


TINY_QUANT = {**TINY, "hidden_size": 128, "intermediate_size": 512, "head_dim": 64,
              "architectures": ["LlamaForCausalLM"]}
"""Quantized under TP: wo's K = 8 heads x 64 and w_down's K = 512 leave whole int4 groups
of 128 (and AWQ's 32) on each of 4 devices."""


def run_worker(model: str, load_format: str, sizes: list[int], backend: str = "cpu",
               expert_parallel: bool = False, quantization: str = "") -> dict[int, dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "ENGINE_TEST_BACKEND": backend,
           "ENGINE_TEST_EP": "1" if expert_parallel else "", "ENGINE_TEST_QUANT": quantization}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.parallel.tp_worker", model, load_format,
         *map(str, sizes)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["tp"]: r for r in rows}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(TINY))
    return run_worker(str(folder / "config.json"), "dummy", [1, 2, 4, 8])


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tiny_model_same_tokens_as_tp1(tiny_runs, tp):
    base, run = tiny_runs[1], tiny_runs[tp]
    assert run["tokens"] == base["tokens"]
    for a, b in zip(run["logprobs"], base["logprobs"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_weights_and_kv_are_sharded_by_logical_axes(tiny_runs):
    two, four = tiny_runs[2], tiny_runs[4]
    # fused q/k/v [E, Hkv, G + 2, D]: each device holds whole KV heads with their queries
    assert two["wqkv"] == [None, "tp", None, None] and two["wq"] is None
    assert two["w_down"] == ["tp", None]  # row-parallel MLP output
    # fused gate/up [E, F, 2]: each device holds the gate and up columns of its F channels
    assert two["w_gate_up"] == four["w_gate_up"] == [None, "tp", None]
    assert two["kv_devices"] == 2
    assert two["kv"] == [None, None, "tp", None]  # [pages, page, Hkv, D]: heads split
    # 2 KV heads on 4 devices: K/V projections and the cache are replicated, the query
    # heads split, so q/k/v stay three weights.
    assert four["wk"] == [None, None, None] and four["kv"] == [None, None, None, None]
    assert four["wq"] == [None, "tp", None] and four["kv_devices"] == 4
    assert four["wqkv"] is None


def test_kernel_backend_runs_attention_per_device(tiny_runs, tmp_path):
    """The CUDA backend's Pallas kernels (interpreted here) are opaque to the SPMD
    partitioner: under TP they run per device on their heads (shard_map), with the KV cache
    sharded (TP 2) or replicated and sliced per device (TP 4)."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    runs = run_worker(str(tmp_path / "config.json"), "dummy", [2, 4], backend="cuda")
    for tp in (2, 4):
        assert runs[tp]["per_device_attention"]
        assert runs[tp]["tokens"] == tiny_runs[1]["tokens"]
    assert not tiny_runs[2]["per_device_attention"]  # the CPU oracle is partitioned by XLA
    assert runs[2]["kv"] == ["tp", None, None, None]  # head-major [Hkv, pages, page, D]


def test_moe_expert_parallel_same_tokens_as_one_device(tmp_path):
    """Whole experts per device (shard_map over the tp axis) or each expert's width split
    (XLA's partitioner): both give the unsharded model's tokens."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_MOE))
    model = str(tmp_path / "config.json")
    base = run_worker(model, "dummy", [1])[1]
    ep = run_worker(model, "dummy", [2, 8], expert_parallel=True)
    width = run_worker(model, "dummy", [4])[4]
    for run in (ep[2], ep[8], width):
        assert run["tokens"] == base["tokens"]
        for a, b in zip(run["logprobs"], base["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    assert ep[2]["expert_gate"] == ["tp", None, None]  # [X, E, F]: experts split
    assert ep[2]["expert_axis"] == "tp" and width["expert_axis"] is None  # shard_map or XLA
    assert width["expert_gate"] == [None, None, "tp"]  # each expert's width split


def test_default_model_tp4_same_tokens(default_gguf):
    # quantization auto is f32 under a mesh; TP 1 gets the same (auto alone would keep gguf)
    runs = run_worker(str(default_gguf), "auto", [1, 4], quantization="f32")
    assert runs[4]["tokens"] == runs[1]["tokens"]


def _same_as_tp1(runs: dict[int, dict], sizes: list[int]) -> None:
    for tp in sizes:
        assert runs[tp]["tokens"] == runs[1]["tokens"], tp
        for a, b in zip(runs[tp]["logprobs"], runs[1]["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_int8_at_load_sharded_with_its_scales(tmp_path):
    """--quantization int8 under TP 4: TP 1's tokens; rows (and their per-row scales) split
    with the heads / MLP width, wo and w_down split along K."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_QUANT))
    runs = run_worker(str(tmp_path / "config.json"), "dummy", [1, 4], quantization="int8")
    _same_as_tp1(runs, [4])
    q4 = runs[4]["quantized"]
    # [N, K] (the CPU backend's layers are unrolled). 2 KV heads on 4 devices: q/k/v stay
    # apart, wk/wv replicated, the query heads' rows split with their scales [N]
    assert q4["wq"] == ["int8", ["tp", None], ["tp"]]
    assert q4["wk"] == ["int8", [None, None], [None]]
    assert q4["wo"] == ["int8", [None, "tp"], [None]]  # K split, per-row scales whole
    assert q4["w_gate_up"] == ["int8", ["tp", None], ["tp"]]  # whole channels' rows
    assert q4["w_down"][1] == [None, "tp"]


def test_prequantized_awq_checkpoint_sharded(tmp_path):
    """An AWQ (int4) checkpoint under TP 2: TP 1's tokens; q/k/v fused (rows by KV head),
    the group-wise scales and zero points split along K with the codes for wo and w_down."""
    from tests.models.prequant_checkpoints import write_checkpoint

    write_checkpoint(tmp_path, "awq", config=TINY_QUANT)
    runs = run_worker(str(tmp_path), "auto", [1, 2])
    _same_as_tp1(runs, [2])
    q2 = runs[2]["quantized"]
    assert q2["wo"] == ["int4", [None, "tp"], [None, "tp"]]  # [N, K/2], scales [N, K/G]
    assert q2["wqkv"] == ["int4", ["tp", None], ["tp", None]]
    assert q2["w_gate_up"] == ["int4", ["tp", None], ["tp", None]]  # whole channels' rows


def test_prequantized_fp8_experts_expert_parallel(tmp_path):
    """A Qwen3-MoE checkpoint with FP8 experts (compressed-tensors, per channel) under
    expert parallelism on 2 devices: TP 1's tokens, whole quantized experts per device."""
    from tests.models.prequant_checkpoints import MOE_CONFIG, write_checkpoint

    write_checkpoint(tmp_path, "ct-fp8", config={**MOE_CONFIG, "num_experts": 8,
                                                 "vocab_size": 512})
    runs = run_worker(str(tmp_path), "auto", [1, 2], expert_parallel=True)
    _same_as_tp1(runs, [2])
    assert runs[2]["expert_axis"] == "tp"
    assert runs[2]["quantized"]["expert_gate"] == ["fp8", ["tp", None, None], ["tp", None]]
