"""The TPU backend's contract pieces: KV writes in its own layout, block sizes, options, checks."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from backends.tpu.backend import TpuBackend
from backends.tpu.kernels.ragged_paged_attention import (
    BlockSizes,
    from_oracle_layout,
    get_block_sizes,
    ragged_paged_attention,
    static_validate_inputs,
)
from backends.tpu.kernels.ragged_paged_attention.tuned_block_sizes import (
    VMEM_BUDGET_BYTES,
    chip_name,
    vmem_bytes,
)
from engine.attention import AttentionMetadata, write_kv
from engine.backend import get_backend
from tests.backends.ragged_batches import make_case

ONE_BLOCK = BlockSizes(1, 16, 1)
INTERPRET = {"interpret": True}
"""The kernel in the Pallas TPU interpreter: there is no TPU in the default test run."""


@pytest.mark.parametrize("stacked", [False, True])
def test_write_kv_equals_the_default_write_in_the_tpu_layout(stacked):
    """Same slots, same values: the TPU write into [L?, pages, Hkv, page, D] is the default
    write into [L?, pages, page, Hkv, D], transposed; padding slots are dropped."""
    rng = np.random.default_rng(0)
    pages, page, hkv, d, t, layers = 5, 4, 2, 8, 7, 3
    shape = (layers, pages, page, hkv, d) if stacked else (pages, page, hkv, d)
    k0, v0 = jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32)
    k, v = jnp.asarray(rng.standard_normal((2, t, hkv, d)), jnp.float32)
    slots = rng.permutation(pages * page)[:t].astype(np.int32)
    slots[-2:] = pages * page  # padding tokens
    slots = jnp.asarray(slots)
    layer = jnp.int32(1) if stacked else None
    want_k, want_v = write_kv(k0, v0, k, v, slots, layer)
    got_k, got_v = TpuBackend(INTERPRET).write_kv(from_oracle_layout(k0),
                                                  from_oracle_layout(v0), k, v, slots, layer)
    np.testing.assert_array_equal(got_k, from_oracle_layout(want_k))
    np.testing.assert_array_equal(got_v, from_oracle_layout(want_v))
    assert not np.array_equal(want_k, k0)  # the write did something


@pytest.mark.parametrize("chip", ["v5e", "v6e", "interpret"])
@pytest.mark.parametrize("dtype,itemsize", [("bfloat16", 2), ("float32", 4)])
@pytest.mark.parametrize("hkv,g,d", [(8, 4, 128), (3, 3, 64), (1, 8, 128), (16, 1, 128)])
@pytest.mark.parametrize("page", [16, 64, 256])
def test_block_sizes_fit_vmem_and_the_shapes(chip, dtype, itemsize, hkv, g, d, page):
    for tokens, pages_per_seq in [(16, 4), (512, 128), (1024, 2048)]:
        bs = get_block_sizes(chip, dtype, head_dim=d, page_size=page, num_kv_heads=hkv,
                             num_q_per_kv=g, num_tokens=tokens, pages_per_seq=pages_per_seq,
                             itemsize=itemsize)
        assert hkv % bs.kv_heads_per_block == 0
        assert 1 <= bs.kv_pages_per_block <= pages_per_seq
        assert bs.queries_per_block % 16 == 0 and bs.queries_per_block <= max(16, tokens)
        used = vmem_bytes(bs, page_size=page, head_dim=d, num_q_per_kv=g, itemsize=itemsize)
        smallest = BlockSizes(1, bs.queries_per_block, 1)
        assert used <= VMEM_BUDGET_BYTES[chip] or bs == smallest


def declared_vmem(bs: BlockSizes, *, page: int, d: int, g: int, hkv: int, dtype) -> int:
    """VMEM the kernel itself declares for these block sizes, read from its traced
    pallas_call (no TPU needed): its VMEM scratch, plus the q and output blocks, which the
    pipeline double-buffers."""
    i32, sds = jnp.int32, jax.ShapeDtypeStruct
    t, npb = bs.queries_per_block, bs.kv_pages_per_block
    md = AttentionMetadata(
        positions=sds((t,), i32), slot_mapping=sds((t,), i32), token_seq=sds((t,), i32),
        query_start=sds((2,), i32), seq_lens=sds((1,), i32), page_table=sds((1, npb), i32),
        num_tokens=sds((), i32), page_size=page)
    kv = sds((npb, hkv, page, d), dtype)
    jaxpr = jax.make_jaxpr(lambda q, k, v, md: ragged_paged_attention(
        q, k, v, md, scale=1.0, block_sizes=bs, interpret=False))(
        sds((t, hkv * g, d), dtype), kv, kv, md)
    eqns = list(jaxpr.eqns)
    while (call := eqns.pop(0)).primitive.name != "pallas_call":  # inside the jit
        eqns += [e for p in call.params.values() if hasattr(p, "jaxpr") for e in p.jaxpr.eqns]
    gm = call.params["grid_mapping"]
    size = lambda ref: math.prod(ref.inner_aval.shape) * ref.inner_aval.dtype.itemsize
    space = lambda ref: str(ref.memory_space).lower()
    blocks = sum(2 * size(b.block_aval) for b in gm.block_mappings
                 if "any" not in space(b.block_aval))  # K/V stay in HBM (memory_space ANY)
    return blocks + sum(size(s) for s in gm.scratch_avals if "vmem" in space(s))


@pytest.mark.parametrize("chip, dtype, hkv, g, d, page", [
    ("v5e", jnp.bfloat16, 8, 4, 128, 16), ("v6e", jnp.bfloat16, 8, 4, 128, 64),
    ("v5e", jnp.float32, 3, 3, 64, 16), ("v6e", jnp.bfloat16, 1, 8, 128, 256)])
def test_vmem_estimate_counts_what_the_kernel_allocates(chip, dtype, hkv, g, d, page):
    """vmem_bytes (by which get_block_sizes fits the budget) against the kernel's own
    allocations, plus its two f32 score tiles (s and p: [rows, K/V block tokens])."""
    itemsize = jnp.dtype(dtype).itemsize
    bs = get_block_sizes(chip, jnp.dtype(dtype).name, head_dim=d, page_size=page,
                         num_kv_heads=hkv, num_q_per_kv=g, num_tokens=512, pages_per_seq=128,
                         itemsize=itemsize)
    rows = bs.kv_heads_per_block * g * bs.queries_per_block
    scores = 2 * rows * bs.kv_pages_per_block * page * 4
    assert vmem_bytes(bs, page_size=page, head_dim=d, num_q_per_kv=g, itemsize=itemsize) == \
        declared_vmem(bs, page=page, d=d, g=g, hkv=hkv, dtype=dtype) + scores


def test_chip_names():
    assert chip_name("TPU v5 lite") == "v5e"
    assert chip_name("TPU v6 lite") == "v6e"
    assert chip_name("TPU v5e") == "v5e"


def test_backend_options():
    backend = get_backend("tpu", {"kv_pages_per_block": 3, **INTERPRET})
    assert isinstance(backend.interpret, pltpu.InterpretParams)
    assert backend.capabilities.platform == "cpu" and backend.chip == "interpret"
    assert backend.kv_cache_shape(10, 16, 2, 64) == (10, 2, 16, 64)
    assert TpuBackend({"interpret": "hlo"}).interpret is True
    with pytest.raises(ValueError, match="only a single chip"):
        TpuBackend({"mesh": "2x4", **INTERPRET})
    with pytest.raises(ValueError, match="unknown tpu backend options"):
        TpuBackend({"kv_page_per_block": 3})
    with pytest.raises(ValueError, match="interpret must be"):
        TpuBackend({"interpret": "maybe"})
    with pytest.raises(ValueError, match="interpret must be"):
        TpuBackend({"interpret": "auto"})  # interpreting is asked for, never a fallback


def test_block_size_overrides_reach_the_kernel():
    case = make_case(np.random.default_rng(1), kv_lens=[40], q_lens=[3], page_size=8, hq=2,
                     hkv=1, d=16)
    backend = TpuBackend({"kv_pages_per_block": 3, "queries_per_block": 32, **INTERPRET})
    bs = backend.block_sizes(jnp.asarray(case.q), jnp.asarray(case.k_cache), case.md)
    assert (bs.kv_pages_per_block, bs.queries_per_block) == (3, 32)


def test_input_checks_name_the_problem():
    case = make_case(np.random.default_rng(2), kv_lens=[9], q_lens=[2], page_size=8, hq=2,
                     hkv=1, d=16)
    k = from_oracle_layout(case.k_cache)
    call = lambda q, k, layer=None, bs=ONE_BLOCK, interpret=True: (
        ragged_paged_attention(q, k, k, case.md, layer, scale=1.0, block_sizes=bs,
                               interpret=interpret))
    with pytest.raises(ValueError, match="needs `layer`"):
        call(case.q, k[None])
    with pytest.raises(ValueError, match="share a dtype"):
        call(case.q.astype(jnp.bfloat16), k)
    with pytest.raises(ValueError, match="must divide"):
        call(case.q, k, bs=BlockSizes(1, 16, 2))
    with pytest.raises(ValueError, match="sublane tile 16"):  # bf16 pages of 8 on a TPU
        jax.jit(lambda q, k: call(q, k, interpret=False)).lower(
            jnp.asarray(case.q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16))


def test_page_table_too_big_for_smem_is_refused_on_tpu():
    """A 64 x 4096 page table ran out of v5e SMEM in Mosaic; the check says so up front."""
    case = make_case(np.random.default_rng(4), kv_lens=[9], q_lens=[2], page_size=16, hq=2,
                     hkv=1, d=16)
    k = from_oracle_layout(case.k_cache)
    big = dataclasses.replace(case.md, page_table=np.zeros((64, 4096), np.int32),
                              seq_lens=np.zeros(64, np.int32),
                              query_start=np.zeros(65, np.int32))
    with pytest.raises(ValueError, match="does not fit TPU SMEM"):
        static_validate_inputs(case.q, k, k, big, None, ONE_BLOCK, on_tpu=True)
    static_validate_inputs(case.q, k, k, big, None, ONE_BLOCK, on_tpu=False)  # interpret: ok


def test_kernel_lowers_to_mosaic_for_tpu():
    """Lowering for the 'tpu' platform (no device or libtpu needed) runs Pallas's Mosaic
    lowering of the kernel: every op in it must have a Mosaic rule."""
    case = make_case(np.random.default_rng(3), kv_lens=[20, 5], q_lens=[20, 1], page_size=16,
                     hq=8, hkv=2, d=128, dtype=jnp.bfloat16)
    k = jnp.asarray(from_oracle_layout(case.k_cache))[None]
    f = jax.jit(lambda q, k, md, layer: ragged_paged_attention(
        q, k, k, md, layer, scale=0.1, block_sizes=BlockSizes(2, 32, 2), interpret=False))
    text = f.trace(jnp.asarray(case.q), k, case.md, jnp.int32(0)).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1
