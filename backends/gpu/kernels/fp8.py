"""float8_e4m3fnuz (MI300's FP8) values from their bits inside a Pallas (Triton) kernel.

jax's Pallas Triton lowering refuses every conversion from or to float8_e4m3fnuz (jax 0.10:
`cannot cast from float8_e4m3fnuz`), though Triton's AMD backend has the type. A kernel
that upcasts fnuz data (the weight-only GEMM's fp8 tile, an fnuz KV cache's blocks) decodes
the bytes with integer operations instead: exact, for every byte but 0x80 (fnuz's one NaN,
read as -0; no writer here makes it: weights are converted from e4m3fn, the KV cache is
written clipped). The FP8 dot on fnuz operands needs no conversion and takes the type as it
is. Never run on an AMD GPU (2026-12-04); checked against ml_dtypes on all 256 bytes and
compiled for gfx942 by Triton (tests/backends/rocm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FNUZ = jnp.dtype(jnp.float8_e4m3fnuz)


def fnuz_values(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """uint8 bits of float8_e4m3fnuz -> their values as `dtype` (exact in f32 and bf16).

    A byte is s eeee mmm, exponent bias 8: e > 0 is 2^(e-8) * (1 + m/8), which float32
    holds as exponent field e + 119 and mantissa m << 20; e = 0 is m * 2^-10."""
    u = bits.astype(jnp.uint32)
    e, m = (u >> 3) & 0xF, u & 0x7
    normal = lax.bitcast_convert_type(((e + 119) << 23) | (m << 20), jnp.float32)
    v = jnp.where(e > 0, normal, m.astype(jnp.float32) * 2.0**-10)
    return jnp.where(u >= 0x80, -v, v).astype(dtype)


def upcast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x (loaded in a kernel) as `dtype`: float8_e4m3fnuz through its bits, else a cast."""
    if jnp.dtype(x.dtype) == FNUZ:
        return fnuz_values(lax.bitcast_convert_type(x, jnp.uint8), dtype)
    return x.astype(dtype)
