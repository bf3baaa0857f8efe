"""From the model's logical axis names (engine.model.axes) to shardings on the mesh.

Rules map a logical axis to a mesh axis (or None: replicated). A dimension whose size
the mesh axis does not divide is replicated instead (e.g. 2 KV heads on 4 devices: each
device keeps both, as vLLM does when KV heads < TP), so every rule is safe to apply.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.model.axes import Axes, param_axes
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


def shard_params(params: Any, mesh: Mesh, rules: Rules) -> Any:
    """Place every parameter on the mesh by its logical axes."""
    axes = param_axes(params)

    multi_process = jax.process_count() > 1

    def put(a: jax.Array, ax: Axes) -> jax.Array:
        sharding = NamedSharding(mesh, spec_for(ax, a.shape, mesh, rules))
        # Across processes, each one places its own (identical) host copy's shards.
        return jax.device_put(np.asarray(a) if multi_process else a, sharding)

    placed = jax.tree.map(put, params, axes, is_leaf=lambda x: isinstance(x, jax.Array))
    return placed


def kv_sharding(shape: tuple[int, ...], axes: Axes, *, mesh: Mesh, rules: Rules
                ) -> NamedSharding:
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
