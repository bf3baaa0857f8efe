"""One K/V cache write per layer: this step's K and V rows into the head-major paged caches
in one Pallas (Triton) kernel.

XLA makes the write two scatters (one per cache), each its own kernel: 64 kernels a step
for 32 layers, 0.137 ms of a 4.8 ms batch-1 decode step on an H200 (the 2026-12-01 profile
in docs/benchmarks.md). Here one program per token stores its K and V rows [Hkv, D] at its
slot of both caches, which the call aliases to its outputs (written in place).

Layouts: k, v [T, Hkv, D]; caches [Hkv, pages, page, D] (backends/gpu/backend.py), seen
flat as [Hkv, pages * page, D], whose row `slot` is the flat slot page * page_size + offset.
Slots outside [0, pages * page) (the runner's padding tokens) write nothing, as XLA's
scatter with mode="drop" (engine.attention.write_kv, the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from engine.attention import to_cache_dtype


def reference(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
              slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two scatters XLA makes: the kernel's oracle and the fallback."""
    page = k_cache.shape[2]
    idx = (slice(None), slots // page, slots % page)  # -> [Hkv, T, D]
    k_cache = k_cache.at[idx].set(to_cache_dtype(k.swapaxes(0, 1), k_cache.dtype), mode="drop")
    v_cache = v_cache.at[idx].set(to_cache_dtype(v.swapaxes(0, 1), v_cache.dtype), mode="drop")
    return k_cache, v_cache


def supported(hkv: int, d: int) -> bool:
    """Triton tiles of [Hkv, 1, D] need powers of two."""
    return hkv & (hkv - 1) == 0 and d & (d - 1) == 0


def _kernel(slot_ref, k_ref, v_ref, _k_in, _v_in, k_out, v_out, *, rows: int):
    # slot_ref [1]; k_ref, v_ref [Hkv, D] (this token's); k_out, v_out [Hkv, rows, D]
    # (the whole caches, aliased to _k_in/_v_in: rows not stored keep their contents).
    slot = slot_ref[0]
    ok = (slot >= 0) & (slot < rows)
    at = jnp.clip(slot, 0, rows - 1)  # in bounds even where masked
    hkv, d = k_ref.shape
    mask = jnp.broadcast_to(ok, (hkv, 1, d))
    plgpu.store(k_out.at[:, pl.ds(at, 1), :], k_ref[...][:, None, :], mask=mask)
    plgpu.store(v_out.at[:, pl.ds(at, 1), :], v_ref[...][:, None, :], mask=mask)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
             slots: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """k, v [T, Hkv, D] into the caches [Hkv, pages, page, D] at flat slots [T] (converted
    to the caches' dtype first: an fp8 cache stores them clipped, as to_cache_dtype)."""
    hkv, pages, page, d = k_cache.shape
    t = k.shape[0]
    if k.shape[1:] != (hkv, d) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {k.shape}, v {v.shape} do not fit the caches {k_cache.shape}, "
                         f"{v_cache.shape} ([Hkv, pages, page, D])")
    if not supported(hkv, d):
        raise ValueError(f"{hkv} KV heads of {d}: the kernel needs powers of two "
                         f"(kv_write.supported); use kv_write.reference")
    rows = pages * page
    flat = (hkv, rows, d)
    cache_spec = pl.BlockSpec(flat, lambda i: (0, 0, 0))  # whole: stores index it by slot
    token_spec = pl.BlockSpec((None, hkv, d), lambda i: (i, 0, 0))
    kc, vc = pl.pallas_call(
        functools.partial(_kernel, rows=rows),
        grid=(t,),
        in_specs=[pl.BlockSpec((1,), lambda i: (i,)), token_spec, token_spec, cache_spec,
                  cache_spec],
        out_specs=[cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct(flat, k_cache.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        name="kv_write",
    )(slots.astype(jnp.int32), to_cache_dtype(k, k_cache.dtype),
      to_cache_dtype(v, v_cache.dtype), k_cache.reshape(flat), v_cache.reshape(flat))
    return kc.reshape(k_cache.shape), vc.reshape(v_cache.shape)
