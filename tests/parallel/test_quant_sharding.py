"""quantized_shardings (engine.parallel.sharding) without devices: an abstract 4-way mesh.
The end-to-end checks (TP 2/4 equal TP 1) are in test_tensor_parallel.py."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from engine.model.quant import QuantizedWeight, pack, pack_stacked
from engine.parallel.sharding import TP_RULES, named_sharding, quantized_shardings

MESH = AbstractMesh((4,), ("tp",))
PLACE = functools.partial(named_sharding, mesh=MESH, rules=TP_RULES)


def test_int4_rows_and_groups_follow_the_logical_split():
    wq = pack(jnp.ones((64, 8, 16)), 1, "int4", group=32)  # [E] + [Hq, D]
    s = quantized_shardings(wq, ("embed", "heads", "head_dim"), PLACE)
    assert s.data.spec == PartitionSpec("tp", None) and s.zeros.spec == PartitionSpec("tp", None)
    wo = pack(jnp.ones((8, 16, 64)), 2, "int4", group=32)  # [Hq, D] + [E], K = 128
    s = quantized_shardings(wo, ("heads", "head_dim", "embed"), PLACE)
    assert s.data.spec == PartitionSpec(None, "tp") == s.scales.spec  # 32 per shard: 1 group


def test_split_inside_a_group_is_refused():
    wo = pack(jnp.ones((8, 16, 64)), 2, "int4", group=64)  # K = 128: 32 per shard < 64
    with pytest.raises(ValueError, match="K=128 .*split 4 ways.*multiple of 64"):
        quantized_shardings(wo, ("heads", "head_dim", "embed"), PLACE)


def test_inner_sharded_output_dim_is_replicated():
    """Sharding only head_dim (an inner output dim) would interleave rows: kept whole."""
    w = QuantizedWeight(jnp.zeros((64, 32), jnp.int8), jnp.ones((64,)), "int8", (32,), (4, 16))
    place = functools.partial(named_sharding, mesh=MESH, rules={"head_dim": "tp"})
    s = quantized_shardings(w, ("embed", "heads", "head_dim"), place)
    assert s.data.spec == PartitionSpec(None, None) and s.scales.spec == PartitionSpec(None)


def test_stacked_layers_keep_their_leading_axis_whole():
    """lax.scan's stacked weights [L, N, K]: the layer axis is never split."""
    w = pack_stacked(jnp.ones((2, 8, 16, 64)), 2, "int4", group=32)  # [L] + [Hq, D] + [E]
    s = quantized_shardings(w, ("layers", "heads", "head_dim", "embed"), PLACE)
    assert s.data.spec == PartitionSpec(None, None, "tp") == s.zeros.spec
    w = pack_stacked(jnp.ones((2, 64, 512)), 1, "int8")  # [L] + [E] + [F]
    s = quantized_shardings(w, ("layers", "embed", "mlp"), PLACE)
    assert s.data.spec == PartitionSpec(None, "tp", None) and s.scales.spec == \
        PartitionSpec(None, "tp")
