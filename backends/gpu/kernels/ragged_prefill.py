"""Ragged paged attention for mixed batches (prompt chunks, prefix-extending chunks, decodes)
over a head-major paged KV cache: a Pallas kernel lowered through Triton.

Reference: backends.cpu.attention.ragged_paged_attention (head_major=True) — the tests
compare this wrapper with it (and with dense causal attention).

Layout. q [T, Hq, D] packs every sequence's query tokens; sequence s owns tokens
[query_start[s], query_start[s+1]) at positions seq_len - q_len + i, so its queries are
the last q_len tokens of its K/V. The caches are [Hkv, num_pages, page, D].

Work split. The wrapper cuts each sequence's queries into blocks of BQ consecutive tokens
(a block never spans two sequences) and lists the blocks on the device from query_start and
seq_lens alone: no host-side metadata. The token padding [query_start[S], T) is listed as
blocks too, with no K/V, so every output row is written (zeros there). The static block
count T // BQ + S + 1 bounds sum(ceil(q_len / BQ)) over the S sequences and the padding;
spare blocks have no rows and do nothing. Blocks are ordered by decreasing K/V length, and
the grid is (Hq, blocks) with the head fastest: the GPU starts the longest blocks first
(less tail) and the G query heads of a KV head side by side (their K/V reads hit in L2).

Each program owns one query head of one block: it loads q [BQ, D] (rows past the block's
length masked), walks the sequence's K/V in blocks of BK = pages_per_block * page tokens
gathered through the page table, stopping at the block's last position (causal), and keeps
an online softmax in float32 (exp2 with log2(e) folded into the scale). K/V blocks wholly
below the block's first position need no mask; only the diagonal ones are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from backends.gpu.kernels.flash import MASK_VALUE, compute_dtype, online_softmax_step
from backends.gpu.kernels.fp8 import upcast
from engine.attention import AttentionMetadata


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int
    """Query tokens per program (a power of two >= 16)."""
    block_k: int
    """K/V tokens per inner step (a power of two >= 16); rounded up to whole pages."""
    num_warps: int
    num_stages: int


# Block sizes as data: to be tuned on the H100 with scripts/cuda_prefill_bench.py, whose sweep
# prints the best for the Llama-3.1-8B shape (32 q / 8 kv heads, D 128, page 16, bf16). First
# sweep (H100, jax 0.11.2, Triton 3.6, 8k causal prompt): 128/64/4 warps/2 stages 2.10 ms
# (262 TFLOP/s); 128/128/8/3 2.18 ms; 64/64/4/2 2.44 ms; the rest slower. Contiguous K/V
# (no page table) was only ~3% faster: the cost is the Triton lowering, not the paging.
BLOCK_SIZES = BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=2)
MIN_BLOCK = 16
"""Triton's dot needs tiles of at least 16 in each dimension (smaller K/V blocks gave wrong
results on an H100 in the decode kernel)."""
# MASK_VALUE (kernels/flash.py) is finite, so a fully masked row block never makes inf - inf;
# every query row sees key 0 in its first K/V block, so the running max is real from the
# first step on.
META_FIELDS = 4  # per block: first token, valid rows, first position, page table row


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_inputs(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 md: AttentionMetadata, sizes: BlockSizes) -> None:
    if k_cache.shape != v_cache.shape or k_cache.ndim != 4:
        raise ValueError(f"K/V caches must be [Hkv, pages, page, D] alike, got "
                         f"{k_cache.shape} and {v_cache.shape}")
    hkv, _, page, d = k_cache.shape
    if q.ndim != 3 or q.shape[-1] != d or q.shape[1] % hkv:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}")
    if page != md.page_size:
        raise ValueError(f"cache page {page} != metadata page_size {md.page_size}")
    if md.query_start.shape[0] != md.seq_lens.shape[0] + 1:
        raise ValueError(f"query_start {md.query_start.shape} must be seq_lens "
                         f"{md.seq_lens.shape} plus one")
    for name in ("block_q", "block_k"):
        n = getattr(sizes, name)
        if not _is_pow2(n) or n < MIN_BLOCK:
            raise ValueError(f"{name}={n} must be a power of two >= {MIN_BLOCK}")


def supported(head_dim: int, page_size: int) -> bool:
    """Whether Triton can compile the kernel for this shape (its tiles are powers of two;
    the dot needs D >= 16). Other shapes take the plain-JAX path."""
    return _is_pow2(head_dim) and head_dim >= MIN_BLOCK and _is_pow2(page_size)


def block_table(query_start: jax.Array, seq_lens: jax.Array, num_tokens: int,
                block_q: int, skip: jax.Array | None = None) -> jax.Array:
    """i32 [NB, META_FIELDS], NB = T // BQ + S + 1: per query block (first token, valid
    rows, first position, sequence), longest K/V first. Rows 0: a spare block. The token
    padding [query_start[S], T) is a pseudo-sequence S with no K/V (its output is zero).
    Sequences where `skip` [S] is true get no blocks: their rows are left unwritten."""
    s = seq_lens.shape[0]
    qs = query_start.astype(jnp.int32)
    starts = qs  # [S+1]: the padding pseudo-sequence starts at query_start[S]
    q_lens = jnp.maximum(jnp.append(qs[1:], num_tokens) - qs, 0)  # [S+1]
    if skip is not None:
        q_lens = jnp.where(jnp.append(skip, False), 0, q_lens)
    kv_lens = jnp.append(seq_lens.astype(jnp.int32), 0)  # [S+1]
    n_blocks = -(-q_lens // block_q)  # [S+1]
    ends = jnp.cumsum(n_blocks)  # [S+1]: blocks of sequence s are [ends[s] - n, ends[s])
    nb = num_tokens // block_q + s + 1
    b = jnp.arange(nb, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, b, side="right"), s).astype(jnp.int32)
    j = b - (ends[seq] - n_blocks[seq])  # block index within its sequence
    live = b < ends[-1]
    rows = jnp.where(live, jnp.clip(q_lens[seq] - j * block_q, 0, block_q), 0)
    tok0 = jnp.minimum(starts[seq] + j * block_q, num_tokens)
    # First query position; -1 where the block attends to nothing (no rows, or padding).
    has_kv = (rows > 0) & (seq < s)
    pos0 = jnp.where(has_kv, kv_lens[seq] - q_lens[seq] + j * block_q, -1)
    meta = jnp.stack([tok0, rows, pos0, jnp.minimum(seq, s - 1)], axis=1)  # [NB, 4]
    order = jnp.argsort(-(pos0 + rows), stable=True)  # longest K/V first
    return meta[order]


def _kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float, block_q: int,
            page: int, pages_per_block: int, pages_per_seq: int):
    # meta_ref [4]; pt_ref [S * P']; q_ref, o_ref [T, D]; k_ref, v_ref [pages * page, D]
    d = k_ref.shape[1]
    block_k = pages_per_block * page
    tok0, rows, pos0, seq = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    row_ok = jnp.broadcast_to((jnp.arange(block_q) < rows)[:, None], (block_q, d))  # [BQ, D]
    q = plgpu.load(q_ref.at[pl.ds(tok0, block_q), :], mask=row_ok, other=0)
    cdt = compute_dtype(k_ref.dtype, q_ref.dtype)  # float8 K/V: upcast to q's type
    q = q.astype(cdt)  # [BQ, D]
    q_pos = pos0 + jnp.arange(block_q)  # [BQ]
    qk_scale = scale * math.log2(math.e)
    pt_base = seq * pages_per_seq

    def step(j, carry, masked: bool):  # carry: output [BQ, D], max [BQ], sum [BQ]
        kv_pos = j * block_k + jnp.arange(block_k)  # [BK]
        pages = pt_ref[pt_base + lax.div(kv_pos, page)]  # [BK]: each K/V row's page
        slots = pages * page + lax.rem(kv_pos, page)  # [BK]
        k = upcast(k_ref[slots, :], cdt)  # [BK, D]
        v = upcast(v_ref[slots, :], cdt)
        s = plgpu.dot(q, k, trans_b=True) * qk_scale  # [BQ, BK] float32, log2 units
        if masked:
            s = jnp.where(kv_pos[None, :] <= q_pos[:, None], s, MASK_VALUE)
        return online_softmax_step(carry, s, v)

    # K/V blocks [0, n_full) are visible to every row (keys <= pos0); [n_full, n_all) are
    # the diagonal, up to the last row's position. Spare and padding blocks: pos0 = -1.
    last = pos0 + rows  # one past the last query position = its K/V length
    n_full = lax.div(pos0 + 1, block_k)
    n_all = jnp.where(pos0 >= 0, lax.div(last + block_k - 1, block_k), 0)
    carry = (jnp.zeros((block_q, d), jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, _, denom = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # padding rows: 0 / 1
    plgpu.store(o_ref.at[pl.ds(tok0, block_q), :], out.astype(o_ref.dtype),
                mask=row_ok)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "sizes"))
def ragged_paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           md: AttentionMetadata, *, scale: float, interpret: bool = False,
                           sizes: BlockSizes | None = None, skip: jax.Array | None = None,
                           ) -> jax.Array:
    """q [T, Hq, D]; k_cache, v_cache [Hkv, num_pages, page, D] -> [T, Hq, D].

    Rows of padding tokens (at or past query_start[S]) come out zero; rows of sequences
    where `skip` [S] is true are left unwritten (the caller fills them)."""
    sizes = sizes or BLOCK_SIZES
    check_inputs(q, k_cache, v_cache, md, sizes)
    t, hq, d = q.shape
    hkv, num_pages, page, _ = k_cache.shape
    g = hq // hkv
    bq = sizes.block_q
    ppb = max(1, sizes.block_k // page)
    meta = block_table(jnp.asarray(md.query_start), jnp.asarray(md.seq_lens), t, bq, skip)
    nb = meta.shape[0]
    # Pad the table to whole K/V blocks (extra pages are read, then masked) and flatten it.
    page_table = jnp.asarray(md.page_table, jnp.int32)  # [S, P]
    p = -(-page_table.shape[1] // ppb) * ppb
    page_table = jnp.pad(page_table, ((0, 0), (0, p - page_table.shape[1]))).reshape(-1)
    # One row per cached token (a free reshape): rows are gathered one by one, so a K/V
    # block is a plain [BK, D] tile for the dot, never a reshaped [PPB, page, D] one.
    k_rows = k_cache.reshape(hkv, num_pages * page, d)
    v_rows = v_cache.reshape(hkv, num_pages * page, d)
    kernel = functools.partial(_kernel, scale=scale, block_q=bq, page=page,
                               pages_per_block=ppb, pages_per_seq=p)
    return pl.pallas_call(
        kernel,
        grid=(hq, nb),
        in_specs=[
            pl.BlockSpec((None, META_FIELDS), lambda h, b: (b, 0)),  # meta [4]
            pl.BlockSpec(page_table.shape, lambda h, b: (0,)),  # page table [S * P]
            pl.BlockSpec((t, None, d), lambda h, b: (0, h, 0)),  # q [T, D]
            pl.BlockSpec((None, num_pages * page, d), lambda h, b: (h // g, 0, 0)),  # k
            pl.BlockSpec((None, num_pages * page, d), lambda h, b: (h // g, 0, 0)),  # v
        ],
        out_specs=pl.BlockSpec((t, None, d), lambda h, b: (0, h, 0)),  # o [T, D]
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps,
                                             num_stages=sizes.num_stages),
        name=f"ragged_paged_attention_bq{bq}_bk{ppb * page}",
    )(meta, page_table, q, k_rows, v_rows)
