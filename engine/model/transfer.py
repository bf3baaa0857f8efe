"""Host checkpoint tensors onto the devices without host copies (params_from_hf's transfer).

A loader hands the model's mapping (engine.model.weights) numpy views of the stored bytes
(safetensors are memory-mapped: engine.loader.hf): a linear's HF [N, K] seen as the logical
[*in_shape, *out_shape] is a transposed, reshaped view, not an array in memory. Making it
contiguous and casting it in numpy cost two strided host copies per tensor, several times
slower than the transfer itself (the 2026-12-03 profile: ml_dtypes' bfloat16 transpose
runs at a fraction of memory bandwidth). Instead each view is undone into the stored,
contiguous layout (a permutation of the logical dims; `stored_order`), that block is put
on the device as it is, or on each device only its shard (the target sharding with its
dims permuted the same way: every shard is then a block of the stored tensor, so the
transposition on the device moves nothing between devices), and one jitted program per
(permutation, dtype, target sharding) transposes and casts it there.

`put_all` runs these transfers on a small thread pool, so that reading the file's pages
(page faults of the mapping) overlaps the transfers of other tensors.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MAX_WORKERS = 4
"""Tensors in flight at once: enough to overlap page reads with transfers; each holds at
most one tensor's staging copy on the host."""


def stored_order(x: np.ndarray) -> tuple[int, ...] | None:
    """The permutation `perm` of x's dims for which x.transpose(perm) is C-contiguous (the
    bytes as stored, when x is a transposed or reshaped view of a stored tensor), or None
    when no permutation is (a slice with gaps, negative strides)."""
    perm = tuple(sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]), i)))
    return perm if x.transpose(perm).flags.c_contiguous else None


def _permuted(sharding: NamedSharding, perm: tuple[int, ...]) -> NamedSharding:
    spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(spec[p] for p in perm)))


@functools.lru_cache(maxsize=256)
def _convert_jit(inverse: tuple[int, ...], dtype: np.dtype, sharding: Any) -> Callable:
    """Stored layout -> logical layout and dtype, on the device (kept per key: every layer
    has the same shapes, so a checkpoint compiles a handful of these)."""
    return jax.jit(lambda a: a.transpose(inverse).astype(dtype), out_shardings=sharding)


def to_device(x: np.ndarray, dtype: Any, sharding: Any = None) -> jax.Array:
    """A host array (any strided view) as a device array of `dtype` with x's shape: on the
    default device, or on `sharding` (a NamedSharding: each device receives only its
    shard). Values equal np.ascontiguousarray(x).astype(dtype) put on the device."""
    dtype = np.dtype(dtype)
    perm = stored_order(x)
    if perm is None:  # not a permutation of stored bytes: one host copy
        x = np.ascontiguousarray(x)
        perm = tuple(range(x.ndim))
    stored = x.transpose(perm)  # C-contiguous: the stored bytes, no copy
    inverse = tuple(int(i) for i in np.argsort(perm))
    identity = perm == tuple(range(x.ndim))
    if sharding is None or identity:
        arr = jax.device_put(stored, sharding)
    elif isinstance(sharding, NamedSharding):
        arr = jax.device_put(stored, _permuted(sharding, perm))
    else:  # another kind of sharding: the program below places the result
        arr = jax.device_put(stored)
    if identity and arr.dtype == dtype:
        return arr
    return _convert_jit(inverse, dtype, sharding)(arr)


def put_all(jobs: Sequence[Callable[[], Any]], parallel: bool = True) -> list[Any]:
    """Run the transfer jobs (each puts one tensor), up to MAX_WORKERS at once; results in
    order. The calling thread's default device (jax.default_device is per thread) holds in
    the workers too. `parallel=False`: one after another in this order (a mesh spanning
    several processes, whose programs every process must run alike)."""
    workers = min(MAX_WORKERS, os.cpu_count() or 1, len(jobs))
    if not parallel or workers <= 1:
        return [job() for job in jobs]
    device = jax.config.jax_default_device

    def run(job: Callable[[], Any]) -> Any:
        if device is None:
            return job()
        with jax.default_device(device):
            return job()

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="put") as pool:
        return list(pool.map(run, jobs))
