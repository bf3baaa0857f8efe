"""The CPU ragged paged attention through jax.ffi: the oracle's contract, flash-style in C++.

`kernel(q, k_cache, v_cache, md, *, scale, isa, layer=None)` has the oracle's contract and
result (backends/cpu/attention.py `ragged_paged_attention`): attention.cc computes it with
an online softmax over blocks of 16 key positions, float32 accumulation, caches of float32, bfloat16
or float8_e4m3fn (read upcast), and with `layer` the whole [L, ...] cache read in place at
that layer. The ISA level is the linear kernel's (cpuid, capped by ENGINE_CPU_ISA); where
there is no kernel, CpuBackend.attention runs the oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.kernels import build, linear
from engine.attention import AttentionMetadata

TARGET = "engine_cpu_attention"
CACHE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn)


@functools.cache
def _registered() -> bool:
    """Registers the FFI target once; False without the library."""
    return build.register(TARGET, "EngineCpuAttention") is not None


def isa_level() -> int:
    """The level the kernel runs at (the linear kernel's: cpuid capped by ENGINE_CPU_ISA;
    levels above 2 run the AVX-512 code), or -1: no kernel, the oracle runs."""
    return linear.isa_level() if _registered() else -1


def _check(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | None
           ) -> None:
    want = 4 if layer is None else 5
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if k_cache.ndim != want or k_cache.shape != v_cache.shape:
        lead = "" if layer is None else "L, "
        raise ValueError(f"k and v caches must both be [{lead}num_pages, page, Hkv, D], got "
                         f"{k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"caches must be float32, bfloat16 or float8_e4m3fn of one dtype, "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    hq, d, hkv = q.shape[1], q.shape[2], k_cache.shape[-2]
    if k_cache.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {q.shape} does not fit caches {k_cache.shape}: head dims must "
                         f"match and Hkv ({hkv}) must divide Hq ({hq})")


def kernel(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
           scale: float, isa: int, layer: jax.Array | None = None) -> jax.Array:
    """The FFI call: q [T, Hq, D] -> [T, Hq, D] (q's dtype, float32 inside)."""
    _check(q, k_cache, v_cache, layer)
    if not _registered():
        raise RuntimeError("the CPU kernel library is not available (see the warning above); "
                           "use backends.cpu.attention.ragged_paged_attention")
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    if not isinstance(scale, (int, float, np.floating)):  # a traced scale: fold it into q
        q, scale = q * scale, 1.0
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, i32(md.positions), i32(md.token_seq),
               i32(md.seq_lens), i32(md.page_table), i32(md.num_tokens),
               i32(0 if layer is None else layer), scale=np.float32(scale),
               isa=np.int32(isa))  # [T, Hq, D]
    return out.astype(q.dtype)

