"""Pre-quantized HF checkpoints: the tensors of AWQ, GPTQ and FP8/INT8 checkpoints repacked
into QuantizedWeights (engine.model.quant) as stored, never re-quantized.

Each quantized linear `X` of the checkpoint becomes `X.weight` holding a host QuantizedWeight
of in_shape (K,), out_shape (N,) (HF's [N, K] weight by output channel); the model's loader
gives it its logical shape. The layouts read (`quantization_config.quant_method`):

  awq (GEMM, 4 bits)   X.qweight int32 [K, N/8], X.qzeros int32 [K/G, N/8], X.scales f16
                       [K/G, N]. Eight 4-bit codes per int32 along N, nibble i (bits 4i)
                       holding column 8c + AWQ_ORDER[i]; w = (q - z) * s.
  gptq (4 bits)        X.qweight int32 [K/8, N] (nibble j of row r: k = 8r + j), X.qzeros
                       int32 [K/G, N/8] (nibble j: column 8c + j), X.scales f16 [K/G, N],
                       X.g_idx int32 [K]. The v1 format ("gptq", the default) stores each
                       zero point minus one: z = nibble + 1 (no wrap: nibble 15 is zero 16);
                       checkpoint_format "gptq_v2" stores z itself. w = (q - z) * s.
                       Act-order (g_idx not k // G) is refused: the int4 format's groups are
                       contiguous along K.
  compressed-tensors   X.weight float8_e4m3fn or int8 [N, K], X.weight_scale per tensor
                       ([] or [1]), per channel ([N, 1]) or per 2-D block ([N/bn, K/bk]);
                       X.input_scale (static activation scale) is dropped: the backends
                       scale activations per token at run time. A weight_zero_point
                       (asymmetric) or packed int4 ("pack-quantized") is refused.
  fp8 (transformers)   X.weight float8_e4m3fn [N, K], X.weight_scale_inv float32
                       [ceil(N/bn), ceil(K/bk)] for weight_block_size [bn, bk]; despite the
                       name, w = weight * scale_inv.

Block scales become fp8's grouped scales [N, K/bk] (each block row's scales repeated for
its rows: exact). Only the decoder layers' projections and MoE experts stored per expert
may be quantized (the model stacks an MoE layer's experts into one QuantizedWeight);
quantized embeddings, heads or routers are refused with the tensor named.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np

from engine.loader.checkpoint import ModelLoadError
from engine.model.quant import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ (GEMM) packing: nibble i of an int32 holds column 8c + AWQ_ORDER[i] of its pack."""
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERT = re.compile(r"(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w[123])")
"""An MoE expert's projection, stored per expert (Qwen3-MoE, Mixtral checkpoints)."""
_DROPPED = (".input_scale", ".output_scale", ".k_scale", ".v_scale")
"""Activation / KV scales of static schemes: not part of any weight (see the docstring)."""


def unpack_int32_nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., M] -> uint8 [..., M, 8]: [..., i] = bits 4i..4i+3 of each int32."""
    u = packed.astype(np.int32).view(np.uint32)[..., None]
    return ((u >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)


def int4_weight(codes_nk: np.ndarray, scales_nk: np.ndarray, zeros_nk: np.ndarray
                ) -> QuantizedWeight:
    """codes uint8 [N, K] in [0, 15], scales and zeros [N, K/G] -> an int4 QuantizedWeight
    (byte j = codes 2j in the low nibble, 2j + 1 in the high one)."""
    n, k = codes_nk.shape
    data = codes_nk[:, 0::2] | (codes_nk[:, 1::2] << 4)  # [N, K/2]
    return QuantizedWeight(np.ascontiguousarray(data, np.uint8),
                           np.ascontiguousarray(scales_nk, np.float32), "int4", (k,), (n,),
                           np.ascontiguousarray(zeros_nk, np.float32))


def awq_weight(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> QuantizedWeight:
    order = np.argsort(AWQ_ORDER)  # column j of a pack sits in nibble order[j]
    k = qweight.shape[0]
    codes = unpack_int32_nibbles(qweight)[..., order].reshape(k, -1)  # [K, N]
    zeros = unpack_int32_nibbles(qzeros)[..., order].reshape(qzeros.shape[0], -1)  # [K/G, N]
    return int4_weight(codes.T, scales.astype(np.float32).T, zeros.T.astype(np.float32))


def gptq_weight(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                g_idx: np.ndarray | None, v2: bool, name: str) -> QuantizedWeight:
    k = qweight.shape[0] * 8
    codes = unpack_int32_nibbles(qweight).transpose(0, 2, 1).reshape(k, -1)  # [K, N]
    zeros = unpack_int32_nibbles(qzeros).reshape(qzeros.shape[0], -1).astype(np.float32)
    zeros = zeros if v2 else zeros + 1.0  # [K/G, N]
    groups = scales.shape[0]
    if k % groups:
        raise ValueError(f"{name}: {groups} scale groups do not divide K={k}")
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // (k // groups)):
        raise ValueError(f"{name}: GPTQ act-order (desc_act: g_idx is not k // group_size) "
                         f"is not supported; use a checkpoint quantized with desc_act=false")
    return int4_weight(codes.T, scales.astype(np.float32).T, zeros.T)


def block_scales(scale: np.ndarray, n: int, k: int, block: tuple[int, int] | None,
                 name: str) -> np.ndarray:
    """A stored weight scale (per tensor, per channel or per [bn, bk] block) as float32 [N]
    or [N, K/bk] (each block row's scales repeated for its bn rows)."""
    s = np.asarray(scale, np.float32)
    if s.size == 1:
        return np.full((n,), s.reshape(()), np.float32)
    if s.shape in ((n,), (n, 1)):
        return s.reshape(n)
    bn, bk = block or (-(-n // s.shape[0]), -(-k // s.shape[-1]))
    if s.ndim != 2 or s.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"{name}: scale {s.shape} fits neither a tensor, a channel nor "
                         f"[{bn}, {bk}] blocks of a [{n}, {k}] weight")
    if k % bk:
        raise ValueError(f"{name}: K={k} is not a whole number of {bk}-wide scale blocks")
    return np.repeat(s, bn, axis=0)[:n]  # [N, K/bk]


def scaled_weight(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None,
                  name: str) -> QuantizedWeight:
    """An fp8 or int8 [N, K] weight with its stored scale (w = weight * scale)."""
    n, k = weight.shape
    scales = block_scales(scale, n, k, block, name)
    if weight.dtype == np.int8:
        if scales.ndim != 1:
            raise ValueError(f"{name}: int8 weights with block scales are not supported")
        return QuantizedWeight(np.ascontiguousarray(weight), scales, "int8", (k,), (n,))
    if weight.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"{name}: a {weight.dtype} weight with a scale; expected "
                         f"float8_e4m3fn or int8")
    return QuantizedWeight(np.ascontiguousarray(weight), scales, "fp8", (k,), (n,))


def convert(path: Path, qcfg: dict, tensors: dict[str, np.ndarray]
            ) -> tuple[dict[str, np.ndarray | QuantizedWeight], str]:
    """The checkpoint's tensors with every quantized linear as `X.weight`: QuantizedWeight,
    and the format they hold ('int4', 'fp8' or 'int8'). Errors are ModelLoadErrors."""
    method = str(qcfg.get("quant_method", "?")).lower()
    try:
        out, fmts = _convert(method, qcfg, tensors)
    except ValueError as e:
        raise ModelLoadError(path, f"{method} checkpoint: {e}") from None
    if not fmts:
        raise ModelLoadError(path, f"quantization_config says {method}, but no tensor is "
                             f"quantized in a layout this loader reads")
    if len(fmts) > 1:
        raise ModelLoadError(path, f"mixed quantized formats {sorted(fmts)} in one checkpoint")
    return out, fmts.pop()


def _convert(method: str, qcfg: dict, tensors: dict[str, np.ndarray]
             ) -> tuple[dict[str, np.ndarray | QuantizedWeight], set[str]]:
    out: dict[str, np.ndarray | QuantizedWeight] = dict(tensors)
    for name in [n for n in out if n.endswith(_DROPPED)]:
        del out[name]
    if method in ("awq", "gptq"):
        bits = qcfg.get("bits", qcfg.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"{bits}-bit weights are not supported (4 bits only)")
        version = str(qcfg.get("version", "gemm")).lower()
        if method == "awq" and version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (GEMM only)")
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        for base in [n[:-len(".qweight")] for n in tensors if n.endswith(".qweight")]:
            _check_projection(base)
            parts = {s: out.pop(f"{base}.{s}", None) for s in ("qweight", "qzeros", "scales",
                                                                "g_idx")}
            if parts["qzeros"] is None or parts["scales"] is None:
                raise ValueError(f"{base}: qweight without qzeros and scales")
            if method == "awq":
                w = awq_weight(parts["qweight"], parts["qzeros"], parts["scales"])
            else:
                w = gptq_weight(parts["qweight"], parts["qzeros"], parts["scales"],
                                parts["g_idx"], fmt == "gptq_v2", base)
            out[base + ".weight"] = w
    elif method in ("compressed-tensors", "fp8"):
        if method == "compressed-tensors" and qcfg.get("format") == "pack-quantized":
            raise ValueError("format pack-quantized (packed int4) is not supported")
        suffix = ".weight_scale_inv" if method == "fp8" else ".weight_scale"
        block = qcfg.get("weight_block_size") if method == "fp8" else None
        for base in [n[:-len(suffix)] for n in tensors if n.endswith(suffix)]:
            _check_projection(base)
            if base + ".weight_zero_point" in out:
                raise ValueError(f"{base}: asymmetric weights (weight_zero_point) are not "
                                 f"supported")
            scale = out.pop(base + suffix)
            out[base + ".weight"] = scaled_weight(out[base + ".weight"], scale,
                                                  tuple(block) if block else None, base)
    else:
        raise ValueError("not a supported quantization method; supported: awq, gptq, "
                         "compressed-tensors, fp8")
    return out, {w.fmt for w in out.values() if isinstance(w, QuantizedWeight)}


def _check_projection(base: str) -> None:
    """Only a decoder layer's projection may be quantized (module docstring)."""
    rest = ".".join(base.split(".")[3:])
    if not (base.startswith("model.layers.") and (rest in PROJECTIONS
                                                  or EXPERT.fullmatch(rest))):
        raise ValueError(f"quantized tensor {base} is not a layer projection or MoE expert; "
                         f"quantized embeddings, heads and routers are not supported")

