"""Pre-quantized HF checkpoints (engine.loader.prequant) against their formats' own layouts.

Tiny Llama checkpoints are written in each format's published layout by
tests/models/prequant_checkpoints.py (packed there from the specifications, not by the
loader). Each loads as QuantizedWeights that dequantize to exactly the weights the
checkpoint stands for, and the model built from them (q/k/v fused, layers stacked or not)
gives the logits of the same model built from those float weights.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention
from engine.attention import AttentionMetadata
from engine.loader.checkpoint import ModelLoadError
from engine.loader.load import load_checkpoint
from engine.loader.quantize import quantize_params
from engine.model.llama import forward
from engine.model.packed import UNPACKED
from engine.model.quant import QuantizedWeight, dequantize, reference_linear
from engine.model.weights import fuse_qkv, params_from_hf
from tests.models.prequant_checkpoints import (
    MOE_CONFIG,
    PROJ,
    write_checkpoint,
    write_safetensors,
)

SCHEMES = {"awq": "int4", "gptq": "int4", "ct-fp8": "fp8", "ct-int8": "int8", "hf-fp8": "fp8"}
PAGE, T = 16, 24
TOKENS = np.random.default_rng(1).integers(0, 128, T).astype(np.int32)


@pytest.fixture(scope="module", params=list(SCHEMES))
def written(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_checkpoint(folder, request.param)
    return request.param, folder, ref


def test_tensors_dequantize_to_the_checkpoint_weights(written):
    scheme, folder, ref = written
    ckpt = load_checkpoint(folder, progress=False)
    assert ckpt.quantization == SCHEMES[scheme]
    quantized = {n: w for n, w in ckpt.tensors.items() if isinstance(w, QuantizedWeight)}
    assert len(quantized) == 2 * len(PROJ)  # every projection, nothing else
    for name, w in quantized.items():
        assert w.fmt == SCHEMES[scheme]
        got = np.asarray(dequantize(w)).T  # logical [K] + [N] -> HF [N, K]
        np.testing.assert_allclose(got, ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    if scheme == "hf-fp8":  # 32 x 32 block scales: grouped along K
        assert quantized["model.layers.0.mlp.down_proj.weight"].scales.shape == (64, 4)
    # nothing of the formats' side tensors is left over
    assert not [n for n in ckpt.tensors if not n.endswith(".weight")]


@functools.cache
def _forward(cfg):
    """One jitted forward per config: schemes of one format share its compiled program."""
    return jax.jit(functools.partial(forward, cfg=cfg, linear=reference_linear,
                                     attend=functools.partial(ragged_paged_attention,
                                                              scale=cfg.head_dim**-0.5)))


def _logits(params, cfg) -> np.ndarray:
    pages = T // PAGE + 1
    shape = (pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]
    if isinstance(params["layers"], dict):
        kv = (jnp.zeros((cfg.num_layers, *shape)), jnp.zeros((cfg.num_layers, *shape)))
    md = AttentionMetadata.one_sequence(0, T, np.arange(pages, dtype=np.int32)[None],
                                        PAGE, pages)
    tok = np.zeros(md.positions.shape[0], np.int32)
    tok[:T] = TOKENS
    return np.asarray(_forward(cfg)(params, kv, tok, md, np.arange(T, dtype=np.int32))[0])


@pytest.mark.parametrize("scheme", ["awq", "gptq", "ct-fp8", "hf-fp8"])
def test_model_equals_the_dequantized_float_model(tmp_path, scheme):
    """Layers stacked (lax.scan); unrolled layers run in the tensor-parallel tests (the CPU
    backend's), int8's model path in tests/models/test_quantized_model.py. A wrong row
    order in the q/k/v fusion of quantized rows would change the logits."""
    ref = write_checkpoint(tmp_path, scheme)
    ckpt = load_checkpoint(tmp_path, progress=False)
    cfg = ckpt.config
    params = fuse_qkv(params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=True))
    wqkv = params["layers"]["wqkv"]
    assert isinstance(wqkv, QuantizedWeight) and wqkv.fmt == SCHEMES[scheme]
    expect = _logits(fuse_qkv(params_from_hf(ref, cfg, jnp.float32, scan=True)), cfg)
    np.testing.assert_allclose(_logits(params, cfg), expect, rtol=1e-4, atol=1e-4)
    # --quantization f32 (the CPU default) keeps the pre-quantized weights as they are
    kept = quantize_params(params, cfg, "f32", tmp_path)
    assert kept["layers"]["wo"].fmt == SCHEMES[scheme]
    assert kept["lm_head"].fmt == "f32"


def test_gptq_act_order_is_refused(tmp_path):
    write_checkpoint(tmp_path, "gptq")
    from safetensors.numpy import load_file

    t = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.g_idx"
    t[name] = np.random.default_rng(0).permutation(t[name])  # act-order: groups permuted
    write_safetensors(tmp_path / "model.safetensors", t)
    with pytest.raises(ModelLoadError, match="act-order.*desc_act=false") as e:
        load_checkpoint(tmp_path, progress=False)
    assert "model.layers.1.mlp.down_proj" in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "bitsandbytes"}, "not a supported quantization method"),
    ({"bits": 8}, "8-bit weights are not supported"),
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, change, message):
    write_checkpoint(tmp_path, "awq")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] |= change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_contradicting_quantization_option_is_refused(tmp_path):
    from engine import LLM

    write_checkpoint(tmp_path, "ct-int8")
    # the matching scheme is accepted: the head (float in the checkpoint) is quantized too
    llm = LLM(str(tmp_path), backend="cpu", dtype="float32", quantization="int8",
              max_total_tokens=256, max_running_requests=2, chunked_prefill_size=32)
    params = llm.engine.runner.params
    fmt = lambda w: UNPACKED.get(w.fmt, w.fmt)  # int8x: int8 packed for the CPU's VNNI kernel
    assert fmt(params["lm_head"]) == "int8"
    layers = params["layers"]
    assert fmt((layers if isinstance(layers, dict) else layers[0])["wo"]) == "int8"
    with pytest.raises(ValueError, match=r"pre-quantized \(int8 weights\); quantization gguf"):
        LLM(str(tmp_path), backend="cpu", quantization="gguf", max_total_tokens=256)


@pytest.mark.parametrize("scheme", ["ct-fp8", "hf-fp8"])
def test_moe_fp8_experts_equal_the_dequantized_float_model(tmp_path, scheme):
    """A Qwen3-MoE checkpoint with FP8 experts stored per expert (per-channel or block
    scales): stacked as stored, through the MoE path's ragged_dot."""
    ref = write_checkpoint(tmp_path, scheme, config=MOE_CONFIG)
    ckpt = load_checkpoint(tmp_path, progress=False)
    cfg = ckpt.config
    params = fuse_qkv(params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=True))
    experts = params["layers"]["expert_down"]
    assert isinstance(experts, QuantizedWeight) and experts.fmt == "fp8"
    assert experts.data.shape == (2, 4, 64, 64)  # [L, X, N=E, K=F]
    expect = _logits(fuse_qkv(params_from_hf(ref, cfg, jnp.float32, scan=True)), cfg)
    np.testing.assert_allclose(_logits(params, cfg), expect, rtol=1e-4, atol=1e-4)
