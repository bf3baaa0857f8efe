"""Ragged paged attention for TPU in Pallas (Mosaic): one kernel for a mixed batch of
decodes, prompt chunks and chunks extending a cached prefix.

Why our own kernel and not `jax.experimental.pallas.ops.tpu.ragged_paged_attention`
(checked against jax 0.10.2):
  * it does not run in Pallas's TPU interpret mode on a CPU (the interpreter rejects its
    reshaped refs: "'ReshapeTransform' object has no attribute 'indices'"), and its
    pallas_call takes no `interpret` argument, so without a TPU it cannot be tested;
  * it wants K and V fused and interleaved on the head axis ([pages, page, 2*Hkv, D]);
  * it reads one layer's cache: under lax.scan over layers the stacked [L, ...] cache
    would be sliced, i.e. one layer's whole cache copied per layer per step.
This kernel keeps the module shape of JAX's (reference, input checks, kernel, jitted
wrapper, block sizes as data) and differs where those three points need it.

Cache layout (the TPU backend's own): [L?, pages, Hkv, page, D], head-major inside a page.
One head's page is a contiguous [page, D] tile-aligned slab (page a multiple of the sublane
tile), whatever the number of KV heads (which tensor parallelism makes small); a page of
all heads is one DMA. With a leading L the layer to read is a scalar in SMEM and pages are
fetched from that layer directly: no per-layer copy under scan.

Schedule: grid (kv head blocks, query blocks of bq tokens). A query block walks the
sequences whose tokens it holds; for each it streams that sequence's K/V pages from HBM in
blocks of kv_pages_per_block pages (double-buffered DMA, only the pages the block's causal
horizon needs) and runs an online softmax. State (m, l, acc) is per query row; a row is
updated only by its own sequence, so every grid step is independent ("parallel").

Glossary: T tokens, S sequences, P pages per sequence (page table width), Hq/Hkv query/KV
heads, G = Hq / Hkv, D head dim, bq queries per block, NP pages per K/V block, Hb KV heads
per block, N = G * bq query rows per KV head in a block.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from backends.cpu.attention import ragged_paged_attention as cpu_ragged_paged_attention
from backends.tpu.kernels.ragged_paged_attention.tuned_block_sizes import BlockSizes
from engine.attention import AttentionMetadata

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LANES = 128
# The page table is a scalar-prefetch operand in SMEM (1 MiB on v5e: a 64 x 4096 table
# failed to compile there, 64 x 1024 compiled). Half of it is the table's budget.
SMEM_PAGE_TABLE_BYTES = 512 * 1024

Interpret = bool | pltpu.InterpretParams


# ----------------------------------------------------------------------------- reference


def to_oracle_layout(cache: jax.Array) -> jax.Array:
    """[L?, pages, Hkv, page, D] (this kernel) -> [L?, pages, page, Hkv, D] (the CPU oracle)."""
    return jnp.swapaxes(cache, -3, -2)


def from_oracle_layout(cache: jax.Array) -> jax.Array:
    """[L?, pages, page, Hkv, D] -> [L?, pages, Hkv, page, D]."""
    return jnp.swapaxes(cache, -3, -2)


def ragged_paged_attention_reference(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
    scale: float, layer: jax.Array | None = None,
) -> jax.Array:
    """The CPU oracle on this kernel's cache layout: q [T, Hq, D] -> [T, Hq, D]."""
    return cpu_ragged_paged_attention(q, to_oracle_layout(k_cache), to_oracle_layout(v_cache),
                                      md, scale=scale, layer=layer)


# ------------------------------------------------------------------------ input checks


def sublane_tile(dtype: Any) -> int:
    """Rows of one (rows, 128) VMEM tile: 8 for 32-bit, 16 for bf16."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def static_validate_inputs(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata,
    layer: jax.Array | None, bs: BlockSizes, *, on_tpu: bool,
) -> None:
    """Shape and dtype checks at trace time; raises ValueError with the values."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got {q.shape=}")
    if k_cache.shape != v_cache.shape or k_cache.ndim not in (4, 5):
        raise ValueError(f"caches must be [L?, pages, Hkv, page, D] and equal, got "
                         f"{k_cache.shape=} {v_cache.shape=}")
    if (k_cache.ndim == 5) != (layer is not None):
        raise ValueError(f"a stacked [L, ...] cache needs `layer` and a per-layer cache "
                         f"none: got {k_cache.shape=} with layer={layer}")
    t, hq, d = q.shape
    *_, hkv, page, d_kv = k_cache.shape
    if d_kv != d:
        raise ValueError(f"head dim of q ({d}) != head dim of the cache ({d_kv})")
    if hq % hkv:
        raise ValueError(f"{hq=} query heads must be a multiple of {hkv=} KV heads")
    if page != md.page_size:
        raise ValueError(f"cache page size {page} != metadata {md.page_size=}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q and caches must share a dtype, got {q.dtype=} {k_cache.dtype=} "
                         f"{v_cache.dtype=}")
    s, _ = md.page_table.shape
    if md.seq_lens.shape != (s,) or md.query_start.shape != (s + 1,):
        raise ValueError(f"metadata shapes disagree: {md.page_table.shape=} "
                         f"{md.seq_lens.shape=} {md.query_start.shape=}")
    for name in ("page_table", "seq_lens", "query_start"):
        if getattr(md, name).dtype != jnp.int32:
            raise ValueError(f"md.{name} must be int32, got {getattr(md, name).dtype}")
    if hkv % bs.kv_heads_per_block:
        raise ValueError(f"{bs.kv_heads_per_block=} must divide {hkv=}")
    if bs.queries_per_block % 8 or bs.kv_pages_per_block < 1:
        raise ValueError(f"bad block sizes {bs}")
    if on_tpu:
        if md.page_table.size * 4 > SMEM_PAGE_TABLE_BYTES:
            raise ValueError(f"page table {md.page_table.shape} does not fit TPU SMEM "
                             f"({SMEM_PAGE_TABLE_BYTES} bytes): lower max_model_len or "
                             f"max_running_requests, or raise page_size")
        tile = sublane_tile(q.dtype)
        if page % tile or bs.queries_per_block % tile:
            raise ValueError(f"on TPU {page=} and {bs.queries_per_block=} must be multiples "
                             f"of the {q.dtype} sublane tile {tile}")


def dynamic_validate_inputs(md: AttentionMetadata, num_pages: int) -> None:
    """Host-side checks of concrete metadata (debugging and tests; not run in the step)."""
    qs, lens, table = (np.asarray(x) for x in (md.query_start, md.seq_lens, md.page_table))
    q_lens = np.diff(qs)
    if (q_lens < 0).any():
        raise ValueError(f"query_start must be non-decreasing, got {qs.tolist()}")
    if (q_lens > lens).any():
        raise ValueError(f"a sequence has more queries than K/V: {q_lens=} {lens=}")
    need = -(-lens // md.page_size)
    if (need > table.shape[1]).any():
        raise ValueError(f"page table width {table.shape[1]} < pages needed {need.max()}")
    if ((table < 0) | (table >= num_pages)).any():
        raise ValueError(f"page ids must be in [0, {num_pages})")


# ----------------------------------------------------------------------------- kernel


def _start_both(k_copy, v_copy) -> None:
    k_copy.start()
    v_copy.start()


def _wait_both(k_copy, v_copy) -> None:
    k_copy.wait()
    v_copy.wait()


def _kernel(
    # Scalar prefetch (SMEM).
    seq_lens_ref,  # i32[S]
    page_table_ref,  # i32[S, P]
    query_start_ref,  # i32[S+1]
    first_seq_ref,  # i32[T / bq]: first sequence with tokens in each query block
    scalars_ref,  # i32[2]: (number of real sequences, layer)
    # Inputs.
    q_ref,  # [Hb, G, bq, D] (VMEM block)
    k_hbm,  # [L, pages, Hkv, page, D] (HBM, read by DMA)
    v_hbm,
    # Output.
    o_ref,  # [Hb, G, bq, D]
    # Scratch.
    k_buf,  # [2, NP, Hb, page, D]: two K/V blocks in flight
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (buffer slot)]
    m_ref,  # f32[Hb, N, 128]: running max, replicated over lanes
    l_ref,  # f32[Hb, N, 128]: running softmax denominator
    acc_ref,  # f32[Hb, N, D]: running numerator
    *,
    scale: float,
):
    hb_idx, qb_idx = pl.program_id(0), pl.program_id(1)
    hb, g, bq, d = q_ref.shape
    _, npb, _, page, _ = k_buf.shape
    bk = npb * page
    n = g * bq
    pages_per_seq = page_table_ref.shape[1]
    num_seqs, layer = scalars_ref[0], scalars_ref[1]
    q0 = qb_idx * bq
    h0 = hb_idx * hb

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def token_of_row(width: int) -> jax.Array:
        # [N, width]: the token index of each query row (row r is query head r // bq of
        # the KV head's group, token q0 + r % bq).
        return q0 + lax.broadcasted_iota(jnp.int32, (g, bq, width), 1).reshape(n, width)

    def kv_copies(s, blk, slot, num_pages):
        """(needed, K copy, V copy) for each page of K/V block `blk` of sequence s."""
        out = []
        for i in range(npb):
            col = blk * npb + i
            needed = col < num_pages
            page_id = page_table_ref[s, jnp.minimum(col, pages_per_seq - 1)]
            src = (layer, page_id, pl.ds(h0, hb))
            out.append((
                needed,
                pltpu.make_async_copy(k_hbm.at[src], k_buf.at[slot, i], sems.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[src], v_buf.at[slot, i], sems.at[1, slot]),
            ))
        return out

    def start(s, blk, slot, num_pages):
        for needed, k_copy, v_copy in kv_copies(s, blk, slot, num_pages):
            pl.when(needed)(functools.partial(_start_both, k_copy, v_copy))

    def wait(s, blk, slot, num_pages):
        # Same descriptors and conditions as start(): each started copy is waited once.
        for needed, k_copy, v_copy in kv_copies(s, blk, slot, num_pages):
            pl.when(needed)(functools.partial(_wait_both, k_copy, v_copy))

    def attend_block(blk, slot, q_start, q_end, ctx, kv_end):
        """Online-softmax update of this sequence's rows with K/V block `blk`."""
        tok = token_of_row(bk)
        in_seq = (tok >= q_start) & (tok < q_end)
        col = blk * bk + lax.broadcasted_iota(jnp.int32, (n, bk), 1)
        mask = in_seq & (col <= ctx + (tok - q_start))  # causal, within the sequence
        # Pages past the causal horizon were not fetched: their buffer rows are stale (or
        # NaN-poisoned in interpret mode). Scores are masked by select; V is zeroed so
        # 0 * NaN cannot reach the output.
        kv_ok = blk * bk + lax.broadcasted_iota(jnp.int32, (bk, d), 0) < kv_end
        row_lanes = token_of_row(LANES)
        upd_lanes = (row_lanes >= q_start) & (row_lanes < q_end)  # [N, 128]
        row_d = token_of_row(d)
        upd_d = (row_d >= q_start) & (row_d < q_end)  # [N, D]
        for j in range(hb):
            q = q_ref[j].reshape(n, d)  # [N, D]
            k = k_buf[slot, :, j].reshape(bk, d)  # [bk, D]
            v = jnp.where(kv_ok, v_buf[slot, :, j].reshape(bk, d), 0).astype(v_buf.dtype)
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [N, bk]
            sc = jnp.where(mask, sc, MASK_VALUE)
            m_prev, l_prev, acc_prev = m_ref[j], l_ref[j], acc_ref[j]
            m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))  # [N, 128]
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(sc - m_next[:, :1])  # [N, bk]
            l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [N, D]
            m_ref[j] = jnp.where(upd_lanes, m_next, m_prev)
            l_ref[j] = jnp.where(upd_lanes, l_next, l_prev)
            acc_ref[j] = jnp.where(upd_d, alpha[:, :1] * acc_prev + pv, acc_prev)

    def seq_cond(s):
        return (s < num_seqs) & (query_start_ref[s] < q0 + bq)

    def seq_body(s):
        q_start, q_end = query_start_ref[s], query_start_ref[s + 1]
        kv_len = seq_lens_ref[s]
        ctx = kv_len - (q_end - q_start)  # position of the sequence's first query
        last = jnp.minimum(q_end, q0 + bq) - 1  # its last token in this query block
        kv_end = ctx + (last - q_start) + 1  # keys [0, kv_end) are visible to the block
        has_rows = (q_end > q_start) & (q_end > q0)
        num_blocks = jnp.where(has_rows, pl.cdiv(kv_end, bk), 0)
        num_pages = pl.cdiv(kv_end, page)

        @pl.when(num_blocks > 0)
        def _():
            start(s, 0, 0, num_pages)

        def kv_body(blk, carry):
            slot = blk % 2

            @pl.when(blk + 1 < num_blocks)
            def _():
                start(s, blk + 1, 1 - slot, num_pages)

            wait(s, blk, slot, num_pages)
            attend_block(blk, slot, q_start, q_end, ctx, kv_end)
            return carry

        lax.fori_loop(0, num_blocks, kv_body, 0)
        return s + 1

    lax.while_loop(seq_cond, seq_body, first_seq_ref[qb_idx])

    for j in range(hb):
        den = l_ref[j][:, :1]
        o = acc_ref[j] / jnp.where(den == 0.0, 1.0, den)  # rows of no sequence: 0
        o_ref[j] = o.reshape(g, bq, d).astype(o_ref.dtype)


# ----------------------------------------------------------------------------- wrapper


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret",
                                             "vmem_limit_bytes"))
def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    md: AttentionMetadata,
    layer: jax.Array | None = None,
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: Interpret = False,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:
    """q [T, Hq, D] over the paged cache (this step's K/V already written) -> [T, Hq, D].

    k_cache, v_cache: [pages, Hkv, page, D], or [L, pages, Hkv, page, D] with `layer` the
    index to read. Tokens at or past md.num_tokens (padding) come out as zeros.
    `interpret`: False on TPU; True (HLO interpreter) or pltpu.InterpretParams (the TPU
    simulator: DMAs, semaphores, NaN-filled scratch, bounds checks) on a CPU.
    """
    static_validate_inputs(q, k_cache, v_cache, md, layer, block_sizes,
                           on_tpu=interpret is False)
    if k_cache.ndim == 4:
        k_cache, v_cache = k_cache[None], v_cache[None]  # [1, pages, Hkv, page, D]
    t, hq, d = q.shape
    _, _, hkv, page, _ = k_cache.shape
    g = hq // hkv
    bs = block_sizes
    bq, npb, hb = bs.queries_per_block, bs.kv_pages_per_block, bs.kv_heads_per_block
    t_pad = pl.cdiv(t, bq) * bq
    # q: [T, Hq, D] -> [Hkv, G, T_pad, D], so a block's rows per KV head are one slab.
    qt = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0))).reshape(t_pad, hkv, g, d)
    qt = qt.transpose(1, 2, 0, 3)
    num_q_blocks = t_pad // bq
    q_block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    first_seq = jnp.searchsorted(md.query_start[1:], q_block_starts, side="right")
    num_seqs = jnp.sum(md.seq_lens > 0).astype(jnp.int32)
    layer_idx = jnp.int32(0) if layer is None else jnp.asarray(layer, jnp.int32)
    scalars = jnp.stack([num_seqs, layer_idx])
    prefetch = (md.seq_lens, md.page_table, md.query_start, first_seq.astype(jnp.int32),
                scalars)
    q_spec = pl.BlockSpec((hb, g, bq, d), lambda h, i, *_: (h, 0, i, 0))
    state = pltpu.VMEM((hb, g * bq, LANES), jnp.float32)
    kv_scratch = pltpu.VMEM((2, npb, hb, page, d), k_cache.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(hkv // hb, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[kv_scratch, kv_scratch, pltpu.SemaphoreType.DMA((2, 2)), state,
                            state, pltpu.VMEM((hb, g * bq, d), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem_limit_bytes),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*prefetch, qt, k_cache, v_cache)
    # out: [Hkv, G, T_pad, D] -> [T, Hq, D]
    return out.transpose(2, 0, 1, 3).reshape(t_pad, hq, d)[:t]
