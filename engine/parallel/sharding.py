"""From the model's logical axis names (engine.model.axes) to shardings on the mesh.

Rules map a logical axis to a mesh axis (or None: replicated). A dimension whose size
the mesh axis does not divide is replicated instead (e.g. 2 KV heads on 4 devices: each
device keeps both, as vLLM does when KV heads < TP), so every rule is safe to apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.model.axes import Axes
from engine.parallel.mesh import TP

log = logging.getLogger(__name__)

Rules = dict[str, str | None]

TP_RULES: Rules = {"heads": TP, "kv_heads": TP, "mlp": TP, "vocab": TP, "expert_mlp": TP}
"""Megatron-style tensor parallelism: column-parallel q/k/v/gate/up (heads, MLP width),
row-parallel o/down (XLA inserts the all-reduce), vocab-parallel embedding and head."""

EP_RULES: Rules = {**TP_RULES, "expert": TP, "expert_mlp": None}
"""Expert parallelism: whole experts live on one device each; the rest as TP_RULES."""


def make_rules(expert_parallel: bool, overrides: dict[str, str | None] | None = None) -> Rules:
    return {**(EP_RULES if expert_parallel else TP_RULES), **(overrides or {})}


def spec_for(axes: Axes, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes; non-dividing dims replicate."""
    out: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and (size % mesh.shape[mesh_axis] or mesh_axis in out):
            mesh_axis = None
        out.append(mesh_axis)
    return PartitionSpec(*out)


def named_sharding(shape: tuple[int, ...], axes: Axes, *, mesh: Mesh, rules: Rules
                   ) -> NamedSharding:
    """Where an array with these logical axes lives on the mesh (weights, the KV pool)."""
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def kv_shards(num_kv_heads: int, mesh: Mesh | None, rules: Rules) -> int:
    """How many ways the KV cache is split (1 when KV heads are replicated)."""
    if mesh is None or rules.get("kv_heads") is None:
        return 1
    n = mesh.shape[rules["kv_heads"]]
    return n if num_kv_heads % n == 0 else 1


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy. An array that spans several processes is read from this
    process's own copy when replicated, else gathered (every process calls this in step)."""
    def get(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if a.sharding.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            return multihost_utils.process_allgather(a, tiled=True)
        return a

    return jax.device_get(jax.tree.map(get, tree))


def shard_heads(attend: Callable[..., jax.Array], mesh: Mesh, kv_axes: Axes,
                rules: Rules) -> Callable[..., jax.Array]:
    """Run an attention kernel on each device over its own query heads (shard_map).

    Custom kernels (Pallas) are opaque to XLA's SPMD partitioner, so a backend whose
    attention is one runs it through this. `attend(q [T, Hq, D], k_cache, v_cache, md, **kw)`
    with caches laid out as `kv_axes`. When the KV cache is replicated (KV heads do not
    divide the devices), each device slices the one KV head its query heads read."""
    tp = mesh.shape[TP]
    head_axis = kv_axes.index("kv_heads")
    q_spec = PartitionSpec(None, TP, None)

    def wrapped(q, k_cache, v_cache, md, **kw):
        hq, hkv = q.shape[1], k_cache.shape[head_axis]
        q_per_dev, group = hq // tp, hq // hkv
        sharded_kv = kv_shards(hkv, mesh, rules) == tp
        if hq % tp or not (sharded_kv or group % q_per_dev == 0):
            raise ValueError(f"tensor_parallel_size={tp} must divide the {hq} query heads, "
                             f"and the {hkv} KV heads or the heads per KV head ({group})")
        kv_spec = PartitionSpec(*(TP if i == head_axis and sharded_kv else None
                                  for i in range(len(kv_axes))))

        def local(q, k_cache, v_cache, md):
            if not sharded_kv:  # replicated cache: keep the KV head of this device's q heads
                first = jax.lax.axis_index(TP) * q_per_dev // group
                k_cache, v_cache = (jax.lax.dynamic_slice_in_dim(c, first, 1, head_axis)
                                    for c in (k_cache, v_cache))
            return attend(q, k_cache, v_cache, md, **kw)

        return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                         PartitionSpec()),
                             out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, md)

    return wrapped
