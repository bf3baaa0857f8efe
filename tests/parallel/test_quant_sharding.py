"""quantized_shardings (engine.model.weights) without devices: an abstract 4-way mesh
and host arrays of the stored shapes (the placement reads shapes only). The end-to-end
checks (TP 2/4 equal TP 1) are in test_tensor_parallel.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from engine.model.quant import QuantizedWeight
from engine.model.weights import quantized_shardings
from engine.parallel.sharding import TP_RULES, named_sharding

MESH = AbstractMesh((4,), ("tp",))
PLACE = functools.partial(named_sharding, mesh=MESH, rules=TP_RULES)


def int4(lead: tuple[int, ...], n: int, k: int, group: int, in_shape, out_shape
         ) -> QuantizedWeight:
    """An int4 weight's stored arrays: codes [*lead, N, K/2], scales/zeros [*lead, N, K/G]."""
    groups = np.zeros((*lead, n, k // group), np.float32)
    return QuantizedWeight(np.zeros((*lead, n, k // 2), np.uint8), groups, "int4", in_shape,
                           out_shape, groups)


def test_int4_rows_and_groups_follow_the_logical_split():
    wq = int4((), 128, 64, 32, (64,), (8, 16))  # [E] + [Hq, D]: rows split by heads
    s = quantized_shardings(wq, ("embed", "heads", "head_dim"), PLACE)
    assert s.data.spec == PartitionSpec("tp", None) == s.zeros.spec
    wo = int4((), 64, 128, 32, (8, 16), (64,))  # [Hq, D] + [E], K = 128: 1 group a shard
    s = quantized_shardings(wo, ("heads", "head_dim", "embed"), PLACE)
    assert s.data.spec == PartitionSpec(None, "tp") == s.scales.spec == s.zeros.spec


def test_split_inside_a_group_is_refused():
    wo = int4((), 64, 128, 64, (8, 16), (64,))  # K = 128: 32 a shard, groups of 64
    with pytest.raises(ValueError, match="K=128 .*split 4 ways.*multiple of 64"):
        quantized_shardings(wo, ("heads", "head_dim", "embed"), PLACE)
    gguf = QuantizedWeight(np.zeros((64, 64 // 32 * 18), np.uint8), np.zeros((0,)), "q4_0",
                           (4, 16), (64,))  # K = 64: 16 a shard cuts the 32-blocks
    with pytest.raises(ValueError, match="q4_0 weight of K=64"):
        quantized_shardings(gguf, ("heads", "head_dim", "embed"), PLACE)


def test_inner_sharded_output_dim_is_replicated():
    """Sharding only head_dim (an inner output dim) would interleave rows: kept whole."""
    w = QuantizedWeight(np.zeros((64, 32), np.int8), np.ones((64,)), "int8", (32,), (4, 16))
    place = functools.partial(named_sharding, mesh=MESH, rules={"head_dim": "tp"})
    s = quantized_shardings(w, ("embed", "heads", "head_dim"), place)
    assert s.data.spec == PartitionSpec(None, None) and s.scales.spec == PartitionSpec(None)


def test_stacked_layers_keep_their_leading_axis_whole():
    """lax.scan's stacked weights [L, N, K]: the layer axis is never split."""
    wo = int4((2,), 64, 128, 32, (8, 16), (64,))  # [L] + [Hq, D] + [E]
    s = quantized_shardings(wo, ("layers", "heads", "head_dim", "embed"), PLACE)
    assert s.data.spec == PartitionSpec(None, None, "tp") == s.zeros.spec
    up = QuantizedWeight(np.zeros((2, 512, 64), np.int8), np.ones((2, 512)), "int8", (64,),
                         (512,))  # [L] + [E] + [F]
    s = quantized_shardings(up, ("layers", "embed", "mlp"), PLACE)
    assert s.data.spec == PartitionSpec(None, "tp", None)
    assert s.scales.spec == PartitionSpec(None, "tp")
