"""Pieces shared by the Pallas (Triton) attention kernels: the online softmax step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from engine.attention import is_fp8_kv

MASK_VALUE = -1e30
"""Finite, so a fully masked row never makes inf - inf (an empty split keeps m = MASK_VALUE
and a zero sum)."""


def compute_dtype(kv_dtype: jnp.dtype, q_dtype: jnp.dtype) -> jnp.dtype:
    """The dots' input type: the cache's, or q's for a float8 cache, e4m3fn or MI300's
    e4m3fnuz (its K/V blocks are upcast where loaded; the cache's scale is 1)."""
    return jnp.dtype(q_dtype) if is_fp8_kv(kv_dtype) else jnp.dtype(kv_dtype)


def online_softmax_step(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array,
                        v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One K/V block of flash attention. carry: output [R, D], running max [R] and sum [R],
    float32; s [R, BK]: scores in log2 units (log2(e) folded into the scale); v [BK, D]."""
    acc, m, denom = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    return (acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v), m_new,
            denom * alpha + p.sum(axis=1))
