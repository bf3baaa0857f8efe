"""Tiny pre-quantized Llama checkpoints written in each format's published layout, packed
here from the formats' specifications (AutoAWQ's GEMM packing, AutoGPTQ's v1 packing,
compressed-tensors' and transformers' FP8 tensors), independently of engine.loader.prequant.

`write_checkpoint(folder, scheme)` returns the float32 tensors the checkpoint stands for:
every quantized weight replaced by its exact dequantization (HF names, [N, K]).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

MOE_CONFIG = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
              "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 64, "norm_topk_prob": True}
"""A Qwen3-MoE shape: 4 experts of width 64, 2 per token, experts stored per expert."""
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128,
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "torch_dtype": "float16"}
"""E=64, F=128, 4 query heads of 16, 2 KV heads."""
GROUP = 32
"""AWQ/GPTQ group size (K=64 holds 2 groups, K=128 4)."""
BLOCK = (32, 32)
"""transformers fp8 weight_block_size."""
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROJ_NAMES = {p.rsplit(".", 1)[-1] for p in PROJ}
"""Quantized linears, by their last name part (dense projections and MoE experts alike)."""
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.int8): "I8", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 LE header size, JSON header (dtype, shape, data_offsets
    relative to the data), then the tensors' little-endian bytes."""
    header, blobs, at = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def float_tensors(seed: int = 0, config: dict | None = None) -> dict[str, np.ndarray]:
    """Random float32 weights of a config (CONFIG by default) under HF names: every
    parameter the engine expects (MoE experts per expert: mlp.experts.{j}.*_proj), norms
    near 1."""
    from engine.loader.checkpoint import expected_shapes
    from engine.model.config import ModelConfig

    rng = np.random.default_rng(seed)
    shapes = expected_shapes(ModelConfig.from_hf(config or CONFIG))
    t = {}
    for name, shape in shapes.items():
        norm = name.endswith("norm.weight")
        t[name] = 1 + 0.1 * rng.normal(size=shape) if norm else rng.normal(0, 0.1, shape)
    t["model.embed_tokens.weight"] *= 5
    return {n: a.astype(np.float32) for n, a in t.items()}


def _quantize_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] -> codes [K, N], zeros [K/G, N] (1..15), fp16 scales [K/G, N], and the exact
    dequantized weight [N, K] = (q - z) * s per group of GROUP along K."""
    n, k = w.shape
    g = w.T.reshape(k // GROUP, GROUP, n)  # [K/G, G, N]
    lo, hi = g.min(1), g.max(1)
    scales = ((hi - lo) / 14).astype(np.float16)  # 14 steps: zeros stay in 1..15
    s = scales.astype(np.float32)
    zeros = np.clip(np.round(-lo / s) + 1, 1, 15).astype(np.int64)
    codes = np.clip(np.round(g / s[:, None]) + zeros[:, None], 0, 15).astype(np.int64)
    deq = ((codes - zeros[:, None]) * s[:, None]).reshape(k, n).T
    return codes.reshape(k, n), zeros, scales, deq.astype(np.float32)


def _pack8(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] values in 0..15 -> int32 [...]: value i in bits 4i..4i+3."""
    out = np.zeros(nibbles.shape[:-1], np.uint32)
    for i in range(8):
        out |= nibbles[..., i].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's GEMM packing: nibble i of an int32 holds column AWQ_PACK_ORDER[i] of its 8."""


def _awq(w: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    codes, zeros, scales, deq = _quantize_int4(w)
    def pack(a):  # [R, N] -> [R, N/8]
        cols = a.reshape(a.shape[0], -1, 8)  # [R, N/8, 8] by column within the pack
        return _pack8(cols[..., list(AWQ_PACK_ORDER)])
    return {"qweight": pack(codes), "qzeros": pack(zeros), "scales": scales}, deq


def _gptq(w: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    codes, zeros, scales, deq = _quantize_int4(w)
    k, n = codes.shape
    qweight = _pack8(codes.reshape(k // 8, 8, n).transpose(0, 2, 1))  # [K/8, N], along K
    qzeros = _pack8((zeros - 1).reshape(zeros.shape[0], n // 8, 8))  # v1: zero - 1
    g_idx = (np.arange(k) // GROUP).astype(np.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, deq


def _fp8(w: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] / scale (broadcast to [N, K]) in e4m3, and its exact dequantization."""
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    return q, (q.astype(np.float32) * scale).astype(np.float32)


def write_checkpoint(folder: Path, scheme: str, seed: int = 0,
                     config: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny checkpoint in `scheme` (awq, gptq, ct-fp8, ct-int8, hf-fp8) under `folder`;
    returns the float32 tensors it stands for (module docstring)."""
    cfg = dict(config or CONFIG)
    t = float_tensors(seed, cfg)
    out: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}
    for name, w in t.items():
        base = name[:-len(".weight")]
        if base.rsplit(".", 1)[-1] not in PROJ_NAMES or ".layers." not in base:
            out[name] = w.astype(np.float16)
            ref[name] = out[name].astype(np.float32)
            continue
        n, k = w.shape
        if scheme in ("awq", "gptq"):
            parts, ref[name] = (_awq if scheme == "awq" else _gptq)(w)
            out |= {f"{base}.{s}": a for s, a in parts.items()}
        elif scheme == "ct-fp8":  # per channel; q_proj per tensor with a static input scale
            per_tensor = base.endswith("q_proj")
            m = np.abs(w).max() if per_tensor else np.abs(w).max(1, keepdims=True)
            scale = (m / 448.0).astype(np.float32).reshape((1,) if per_tensor else (n, 1))
            out[name], ref[name] = _fp8(w, scale)
            out[base + ".weight_scale"] = scale
            if per_tensor:
                out[base + ".input_scale"] = np.array([0.02], np.float32)
        elif scheme == "ct-int8":
            scale = (np.abs(w).max(1, keepdims=True) / 127).astype(np.float32)  # [N, 1]
            out[name] = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            ref[name] = out[name].astype(np.float32) * scale
            out[base + ".weight_scale"] = scale
        elif scheme == "hf-fp8":  # [bn, bk] blocks, scale_inv [ceil(N/bn), ceil(K/bk)]
            bn, bk = BLOCK
            blocks = np.abs(np.pad(w, ((0, -n % bn), (0, -k % bk))))
            blocks = blocks.reshape(-(-n // bn), bn, -(-k // bk), bk).max((1, 3)) / 448.0
            scale_inv = blocks.astype(np.float32)
            full = np.repeat(np.repeat(scale_inv, bn, 0), bk, 1)[:n, :k]
            out[name], ref[name] = _fp8(w, full)
            out[base + ".weight_scale_inv"] = scale_inv
        else:
            raise ValueError(scheme)
    if scheme == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                      "version": "gemm", "zero_point": True}
    elif scheme == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                      "desc_act": False, "sym": False}
    elif scheme.startswith("ct-"):
        kind = "float" if scheme == "ct-fp8" else "int"
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized" if kind == "float" else "int-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True}}},
            "ignore": ["lm_head"]}
    else:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": list(BLOCK)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "model.safetensors", out)
    return ref
