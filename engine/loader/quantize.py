"""Quantized weights at load (`--quantization`): the model's projections as QuantizedWeights.

    int8  weight-only, per output channel, made from the loaded float weights (any source:
          HF, GGUF, dummy). The tied embedding is quantized too (it is the head's weight;
          its rows, dequantized, are the token vectors).
    fp8   float8_e4m3 per output channel, made at load like int8; the GPU runs it W8A8
          (activations quantized per token), the reference path weight-only.
    int4  weight-only, asymmetric, group-wise along K (groups of quant.INT4_GROUP, halved
          until they divide K: quant.int4_group), made at load like int8; the head (or
          tied embedding) is int8, as AWQ/GPTQ checkpoints keep theirs at 16 bits: on
          SmolLM2-135M (2026-12-03) an int4 head cost 14 points of greedy agreement more.
    gguf  a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks kept as they are (read again
          from the memory-mapped file); tensors of other types stay the float weights loaded.
    f32   no quantization: float32 weights stored by output channel, so that decode-sized
          steps take the CPU kernel (faster than XLA's dot there; same values).

Projections: wqkv (or wq/wk/wv), wo, w_gate_up (or w_gate/w_up), w_down, and the head
(lm_head, or embed when tied). Norms, biases and MoE experts stay float. Runs after fuse_qkv
and fuse_gate_up. Weights that are QuantizedWeights already (a pre-quantized checkpoint:
engine.loader.prequant) are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.model.config import ModelConfig
from engine.model.quant import (
    QuantizedWeight,
    from_gguf_rows,
    int4_group,
    pack,
    pack_stacked,
)

METHODS = ("int8", "gguf", "f32", "fp8", "int4")
PROJECTIONS = {"wqkv": 1, "wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1,
               "w_gate_up": 1, "w_down": 1}
"""Layer weight -> number of contracted (input) dims of its logical shape."""
GGUF_KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}
"""GGUF tensor types kept as blocks -> the QuantizedWeight format."""
_GGUF_LAYER = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
               "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def resolve_auto(method: str | None, source: Path | None, sharded: bool = False) -> str | None:
    """Quantization 'auto': 'gguf' (the file's blocks kept) for a .gguf file, else 'f32'
    (float32 by output channel: the CPU kernels' layout, values unchanged). Any other
    method is returned as it is. Kept Q4_1 blocks took 1.8x less CPU than f32 at one row
    and 1.5x less at 32 rows (configs/cpu.yaml, 2026-12-04). `sharded` (a mesh): 'f32',
    since a GGUF block of 32 along K need not fit a shard (SmolLM2's K=576 does not split 4
    ways) and the CPU kernels do not run under a mesh anyway."""
    if method != "auto":
        return method
    gguf = source is not None and Path(source).suffix == ".gguf"
    return "gguf" if gguf and not sharded else "f32"


def quantize_params(params: dict, cfg: ModelConfig, method: str, source: Path | None) -> dict:
    """The params with their projections quantized by `method` (in place; returned)."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "gguf":
        if source is None or source.suffix != ".gguf":
            raise ValueError(f"quantization gguf needs a .gguf model file, got {source}")
        return _keep_gguf(params, cfg, source)
    stacked = isinstance(params["layers"], dict)
    packer = pack_stacked if stacked else pack
    for lp in [params["layers"]] if stacked else params["layers"]:
        for name, n_in in PROJECTIONS.items():
            if name in lp and not isinstance(lp[name], QuantizedWeight):
                w = lp[name]  # [(L,) *in_shape, *out_shape]
                k = int(np.prod(w.shape[int(stacked):int(stacked) + n_in]))
                lp[name] = packer(w, n_in, method, group=int4_group(k))
    head = "embed" if cfg.tie_word_embeddings else "lm_head"
    head_fmt = "int8" if method == "int4" else method
    if isinstance(params[head], QuantizedWeight):
        pass
    elif cfg.tie_word_embeddings:  # embed [V, E] is the head's weight by output channel
        params["embed"] = pack(params["embed"].T, 1, head_fmt)  # logical [E] + [V]
    else:
        params["lm_head"] = pack(params["lm_head"], 1, head_fmt)
    return params


def _keep_gguf(params: dict, cfg: ModelConfig, path: Path) -> dict:
    from engine.loader.gguf import read_gguf, unpermute_rows

    file = read_gguf(path)
    e, d, hq, hk = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def rows(name: str) -> tuple[str, np.ndarray] | None:
        """(format, raw rows [N, row bytes]) of a tensor kept as blocks, or None."""
        info = file.tensors.get(name)
        kind = getattr(info.qtype, "name", None) if info is not None else None
        if kind not in GGUF_KEPT or info.shape[-1] % (256 if kind.endswith("_K") else 32):
            return None
        raw = np.array(file.raw(info))  # a copy: the file is closed below
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            raw = unpermute_rows(raw, hq if "attn_q" in name else hk)  # as the float load
        return GGUF_KEPT[kind], raw

    layers = []
    try:
        for i in range(cfg.num_layers):
            got = {n: rows(f"blk.{i}.{g}.weight") for n, g in _GGUF_LAYER.items()}
            kept: dict[str, Any] = {}
            f = cfg.intermediate_size
            shapes = {"wq": (hq, d), "wk": (hk, d), "wv": (hk, d), "w_gate": (f,), "w_up": (f,)}
            for n, shape in shapes.items():
                if got[n] is not None:
                    kept[n] = from_gguf_rows(got[n][1], got[n][0], (e,), shape)
            if got["wo"] is not None:
                kept["wo"] = from_gguf_rows(got["wo"][1], got["wo"][0], (hq, d), (e,))
            if got["w_down"] is not None:
                kept["w_down"] = from_gguf_rows(got["w_down"][1], got["w_down"][0], (f,), (e,))
            qkv = [got[n] for n in ("wq", "wk", "wv")]
            if all(q is not None for q in qkv) and len({q[0] for q in qkv}) == 1:
                # fuse_qkv's order, by rows: per KV head its G query heads, then its K and V.
                q, k, v = (x[1].reshape(hk, -1, d, x[1].shape[-1]) for x in qkv)  # [Hkv, G|1, D, B]
                fused = np.concatenate([q, k, v], axis=1).reshape(-1, q.shape[-1])
                kept["wqkv"] = from_gguf_rows(fused, qkv[0][0], (e,), (hk, hq // hk + 2, d))
            gu = [got[n] for n in ("w_gate", "w_up")]
            if all(x is not None for x in gu) and gu[0][0] == gu[1][0]:
                # fuse_gate_up's order, by rows: per MLP channel its gate row, then its up row.
                fused = np.stack([gu[0][1], gu[1][1]], axis=1).reshape(2 * f, -1)  # [2F, B]
                kept["w_gate_up"] = from_gguf_rows(fused, gu[0][0], (e,), (f, 2))
            layers.append(kept)
        head = rows("output.weight" if "output.weight" in file.tensors else "token_embd.weight")
    finally:
        try:
            file.buffer.close()
        except BufferError:
            pass
    stacked = isinstance(params["layers"], dict)
    if any(all(n in k for n in ("wq", "wk", "wv")) and "wqkv" not in k for k in layers):
        # q/k/v kept as blocks of two formats (Q4_K_M files often store attn_v as Q6_K):
        # three kept weights, not one float fused wqkv, as for gate and up below.
        from engine.model.weights import unfuse_qkv

        unfuse_qkv(params)
        for k in layers:
            k.pop("wqkv", None)
    if any("w_gate" in k and "w_up" in k and "w_gate_up" not in k for k in layers):
        # gate and up kept as blocks of two formats (a mixed-type file): two kept weights,
        # not one float fused weight; place_params (WeightRecipe.finish) places them after.
        from engine.model.weights import unfuse_gate_up

        unfuse_gate_up(params)
        for k in layers:
            k.pop("w_gate_up", None)
    for i, kept in enumerate(layers):
        lp = params["layers"] if stacked else params["layers"][i]
        for name in list(kept):
            if name in lp:
                continue
            del kept[name]  # e.g. wq when the params hold the fused wqkv
    if stacked:
        names = [n for n in layers[0] if all(n in k for k in layers)]
        for n in names:
            params["layers"][n] = jax.tree.map(lambda *xs: jnp.stack(xs), *[k[n] for k in layers])
    else:
        for lp, kept in zip(params["layers"], layers, strict=True):
            lp.update(kept)
    if head is not None:
        w = from_gguf_rows(head[1], head[0], (e,), (cfg.vocab_size,))
        params["embed" if cfg.tie_word_embeddings else "lm_head"] = w
    return params
