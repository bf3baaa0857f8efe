"""Device-side attention metadata for one mixed ragged batch.

Glossary of shapes: T = tokens in the step (padded to a bucket), S = sequences (padded),
P = pages per sequence (padded), page = tokens per page.
A batch mixes decode tokens (one query each), prompt chunks, and chunks that extend a
cached prefix; every backend's attention reads the same metadata.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "positions",
        "slot_mapping",
        "token_seq",
        "query_start",
        "seq_lens",
        "page_table",
        "num_tokens",
    ],
    meta_fields=["page_size", "decode_only"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array
    """i32 [T]: absolute position of each token in its sequence."""
    slot_mapping: jax.Array
    """i32 [T]: flat KV slot (page * page_size + offset) each token's K/V is written to.
    Padding tokens point one past the last slot, so their writes are dropped."""
    token_seq: jax.Array
    """i32 [T]: index of the sequence each token belongs to (padding: 0)."""
    query_start: jax.Array
    """i32 [S+1]: tokens of sequence s are [query_start[s], query_start[s+1])."""
    seq_lens: jax.Array
    """i32 [S]: K/V length of each sequence after this step (cached + new); padding: 0."""
    page_table: jax.Array
    """i32 [S, P]: pages of each sequence in order; unused entries are 0 (read, then masked)."""
    num_tokens: jax.Array
    """i32 []: real tokens in the step; tokens at or past it are padding."""
    page_size: int
    decode_only: bool = False
    """Every sequence has exactly one query token, and token i belongs to sequence i:
    backends may take a decode kernel (a static choice: a separate program)."""

    @property
    def num_seqs_padded(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def one_sequence(cls, start: int, n: int, page_table: np.ndarray, page_size: int,
                     num_pages: int) -> AttentionMetadata:
        """Tokens [start, start + n) of one sequence whose pages are `page_table` [1, P]
        (page p holds positions [p * page_size, ...)); tokens padded to a multiple of 16.
        For references and scripts that drive the model without the scheduler."""
        t = max(16, -(-n // 16) * 16)
        pos = np.zeros(t, np.int32)
        pos[:n] = np.arange(start, start + n)
        pages = page_table[0, pos[:n] // page_size]
        slots = np.full(t, num_pages * page_size, np.int32)
        slots[:n] = pages * page_size + pos[:n] % page_size
        return cls(positions=pos, slot_mapping=slots, token_seq=np.zeros(t, np.int32),
                   query_start=np.array([0, n], np.int32),
                   seq_lens=np.array([start + n], np.int32), page_table=page_table,
                   num_tokens=np.int32(n), page_size=page_size, decode_only=n == 1)


FP8_TYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e4m3fnuz))
"""The e4m3 types of fp8 data (KV caches, engine.model.quant's fp8 weights and W8A8
activations): OCP's (NVIDIA, MI350, the checkpoints) and MI300's."""


def is_fp8_kv(dtype: jnp.dtype) -> bool:
    """Whether a cache of `dtype` is an fp8 one (scale 1: OCP e4m3 for --kv-cache-dtype fp8,
    or MI300's e4m3fnuz where the ROCm backend runs it), which the attention reads upcast."""
    return jnp.dtype(dtype) in FP8_TYPES


def to_cache_dtype(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x as the cache's element type; float8 caches (scale 1) clip first to the type's
    largest value (448 for e4m3fn, 240 for e4m3fnuz), since neither has an infinity and a
    value past it would become NaN."""
    if is_fp8_kv(dtype):
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -top, top)
    return x.astype(dtype)


def write_kv(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array,
    layer: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V [T, Hkv, D] into a paged cache at flat slots [T].

    The cache is one layer's [num_pages, page, Hkv, D], or with `layer` all layers'
    [L, num_pages, page, Hkv, D] (written in place at that layer: no per-layer copy).
    """
    lead = () if layer is None else (layer,)
    page = k_cache.shape[-3]
    idx = (*lead, slots // page, slots % page)
    # Padding slots point past the last page: mode="drop" discards their writes.
    k_cache = k_cache.at[idx].set(to_cache_dtype(k, k_cache.dtype), mode="drop")
    v_cache = v_cache.at[idx].set(to_cache_dtype(v, v_cache.dtype), mode="drop")
    return k_cache, v_cache


def causal_mask_value(dtype: jnp.dtype) -> float:
    return float(jnp.finfo(dtype).min) / 2
