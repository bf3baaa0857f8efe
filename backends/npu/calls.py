"""Attention and KV writes as named JAX primitives, so that they reach the executor whole.

The NPU backend's `attention` and `write_kv` bind these: in the traced step they are one
equation each (`npu_attention`, `npu_write_kv`) with the metadata as operands and the
static facts (scale, page size, decode-only, whether a layer index comes) as parameters.
The executor maps them to torch_npu's fused ops, or to their plain-torch references
(kernels.py). Under JAX (tests, the CPU oracle comparison) they lower to the CPU backend's
attention and engine.attention.write_kv, so a traced step also runs as an ordinary jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from backends.cpu.attention import ragged_paged_attention
from engine.attention import AttentionMetadata, write_kv

attention_p = Primitive("npu_attention")
write_kv_p = Primitive("npu_write_kv")
write_kv_p.multiple_results = True

MD_FIELDS = ("positions", "slot_mapping", "token_seq", "query_start", "seq_lens",
             "page_table", "num_tokens")
"""The metadata arrays an npu_attention equation takes after q, k_cache, v_cache, in order."""


def _md(arrays, page_size: int, decode_only: bool) -> AttentionMetadata:
    return AttentionMetadata(**dict(zip(MD_FIELDS, arrays, strict=True)), page_size=page_size,
                             decode_only=decode_only)


def _attention_jax(q, k_cache, v_cache, *rest, scale, page_size, decode_only, layered):
    md = _md(rest[:len(MD_FIELDS)], page_size, decode_only)
    layer = rest[len(MD_FIELDS)] if layered else None
    return ragged_paged_attention(q, k_cache, v_cache, md, scale=scale, layer=layer)


def _write_kv_jax(k_cache, v_cache, k, v, slots, *layer, layered):
    return list(write_kv(k_cache, v_cache, k, v, slots, layer[0] if layered else None))


attention_p.def_impl(_attention_jax)
attention_p.def_abstract_eval(lambda q, *_, **__: jax.core.ShapedArray(q.shape, q.dtype))
mlir.register_lowering(attention_p, mlir.lower_fun(_attention_jax, multiple_results=False))
write_kv_p.def_impl(_write_kv_jax)
write_kv_p.def_abstract_eval(lambda kc, vc, *_, **__: [jax.core.ShapedArray(kc.shape, kc.dtype),
                                                       jax.core.ShapedArray(vc.shape, vc.dtype)])
mlir.register_lowering(write_kv_p, mlir.lower_fun(_write_kv_jax, multiple_results=True))


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
              scale: float, layer: jax.Array | None = None) -> jax.Array:
    """q [T, Hq, D] over the paged cache -> [T, Hq, D] (the Backend.attention contract)."""
    arrays = [jnp.asarray(getattr(md, f)) for f in MD_FIELDS]
    extra = [] if layer is None else [jnp.asarray(layer, jnp.int32)]
    return attention_p.bind(q, k_cache, v_cache, *arrays, *extra, scale=float(scale),
                            page_size=md.page_size, decode_only=bool(md.decode_only),
                            layered=layer is not None)


def write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array,
          layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """K/V [T, Hkv, D] into the caches at flat slots [T] (the Backend.write_kv contract)."""
    extra = [] if layer is None else [jnp.asarray(layer, jnp.int32)]
    kc, vc = write_kv_p.bind(k_cache, v_cache, k.astype(k_cache.dtype), v.astype(v_cache.dtype),
                             jnp.asarray(slots), *extra, layered=layer is not None)
    return kc, vc
