"""Decode attention over a head-major paged KV cache: the wrapper over the two decode kernels
and their split rule.

Reference: backends.cpu.attention.ragged_paged_attention (head_major=True) — the tests
compare both kernels with it. impl "gqa" (the backend's default) is ours,
kernels/gqa_decode.py; impl "jax" is jax.experimental.pallas.ops.gpu.paged_attention (one
query per sequence, flash-decoding over `k_splits` partitions of the pages), whose cache
layout [Hkv, pages, page, D] and inputs (page table, lengths) are ours. Both take their
split count and block size from `partition` over a table padded by `table_width`; JAX's
kernel splits the table's width, ours each sequence's own length (gqa_decode.split_tokens),
so a table wider than the batch's contexts (page buckets 'max') costs it nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

from backends.gpu.kernels.gqa_decode import gqa_decode_attention
from engine.attention import AttentionMetadata, is_fp8_kv

# Block sizes as data (Llama-3.1-8B shape: 32 q / 8 kv heads, D 128, page 16), from the
# sweep of JAX's kernel in scripts/cuda_probe.py on an H200 (2026-12-01): one pipeline stage
# (NUM_STAGES) beat two by 10-20% at batch 32-256, and splitting each sequence's pages over
# k_splits programs pays only until about TARGET_PROGRAMS programs are running (batch 128,
# ctx 1024: 0.188 ms per layer with 1 split and 1 stage, 2.86 TB/s, against 0.280 ms with 16
# splits and 2 stages).
MIN_BLOCK_K = 16
"""Triton's dot needs K/V blocks of at least 16 tokens: smaller blocks gave wrong results
on an H100 (page 4 with 2 pages a block came out 2x too large)."""
BLOCK_H = 16
PAGES_PER_COMPUTE_BLOCK = 8
MAX_K_SPLITS = 16
TARGET_PROGRAMS = 1024
NUM_WARPS = 4
NUM_STAGES = 1
GQA_NUM_STAGES = 3
"""Our kernel (impl "gqa") pipelines its row gathers: 3 stages against 1 (H200, 2026-12-02,
`scripts/cuda_probe.py OUT decode`): batch 256 ctx 1536 0.381 vs 0.496 ms a layer (4.23 vs
3.24 TB/s of K/V; JAX's kernel 0.538), batch 1 ctx 1024 0.057 vs 0.080 ms (JAX's 0.066)."""


@dataclasses.dataclass(frozen=True)
class DecodeSizes:
    """A target's decode tuning: how `partition` splits the pages and the kernels' launch
    parameters. The defaults are the CUDA (H200) figures above; other targets (ROCm) pass
    their own from their data file."""

    pages_per_compute_block: int = PAGES_PER_COMPUTE_BLOCK
    max_k_splits: int = MAX_K_SPLITS
    target_programs: int = TARGET_PROGRAMS
    """Programs (kv heads x sequences x splits) to keep running; about 8 per SM/CU."""
    num_warps: int = NUM_WARPS
    """Warps (NVIDIA, 32 lanes) or wavefronts (AMD, 64 lanes) per program."""
    num_stages: int = NUM_STAGES
    """Pipeline stages of JAX's kernel (impl "jax")."""
    gqa_num_stages: int = GQA_NUM_STAGES
    """Pipeline stages of ours (impl "gqa")."""
    block_h: int = BLOCK_H
    """Query heads per program of JAX's kernel."""


DECODE_SIZES = DecodeSizes()


def check_inputs(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 md: AttentionMetadata) -> None:
    if k_cache.shape != v_cache.shape or k_cache.ndim != 4:
        raise ValueError(f"K/V caches must be [Hkv, pages, page, D] alike, got "
                         f"{k_cache.shape} and {v_cache.shape}")
    hkv, _, page, d = k_cache.shape
    if q.shape[-1] != d or q.shape[1] % hkv:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}")
    if page != md.page_size:
        raise ValueError(f"cache page {page} != metadata page_size {md.page_size}")
    if not md.decode_only:
        raise ValueError("paged_decode_attention needs a decode-only batch")


def table_width(pages: int, page: int) -> int:
    """The page table's width for the kernels: a power of two of at least one block.
    Triton's blocks are powers of two, and a width such as 9 would split into 3-page blocks;
    the runner's page buckets are powers of two up to the largest, which need not be one
    (max_model_len / page)."""
    return max(-(-MIN_BLOCK_K // page), 1 << (pages - 1).bit_length())


def partition(num_kv_heads: int, num_seqs: int, table_pages: int, page: int,
              sizes: DecodeSizes = DECODE_SIZES) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for a page table `table_pages` wide: the fewest
    splits of each sequence's pages that keep TARGET_PROGRAMS programs (kv heads x
    sequences x splits) running, and blocks of up to PAGES_PER_COMPUTE_BLOCK pages, at least
    MIN_BLOCK_K tokens, that divide a split (both from `sizes`)."""
    fits = [k for k in (1, 2, 4, 8, 16) if k <= sizes.max_k_splits and table_pages % k == 0
            and (table_pages // k) * page >= MIN_BLOCK_K]
    k_splits = next((k for k in fits if num_kv_heads * num_seqs * k >= sizes.target_programs),
                    fits[-1])
    per_split = table_pages // k_splits
    c_max = min(per_split, max(sizes.pages_per_compute_block, -(-MIN_BLOCK_K // page)))
    ppcb = max((c for c in range(1, c_max + 1) if per_split % c == 0 and c * page >= MIN_BLOCK_K),
               default=per_split)
    return k_splits, ppcb


def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           md: AttentionMetadata, *, scale: float,
                           interpret: bool = False, impl: str = "jax",
                           sizes: DecodeSizes = DECODE_SIZES) -> jax.Array:
    """q [T, Hq, D] (token i = sequence i) -> [T, Hq, D]."""
    check_inputs(q, k_cache, v_cache, md)
    t = q.shape[0]
    s = md.page_table.shape[0]
    qs = q[:s] if t >= s else jnp.pad(q, ((0, s - t), (0, 0), (0, 0)))
    o = decode_attention(qs, k_cache, v_cache, md.page_table, md.seq_lens, scale=scale,
                         interpret=interpret, impl=impl, sizes=sizes)
    return o[:t] if t <= s else jnp.pad(o, ((0, t - s), (0, 0), (0, 0)))


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     page_table: jax.Array, seq_lens: jax.Array, *, scale: float,
                     interpret: bool = False, impl: str = "jax",
                     sizes: DecodeSizes = DECODE_SIZES) -> jax.Array:
    """One query per sequence: q [S, Hq, D] over each sequence's first seq_lens [S] cached
    tokens -> [S, Hq, D]. A sequence of length 0 does no work (its output is 0).
    impl: "jax" (JAX's paged_attention) or "gqa" (ours: kernels/gqa_decode.py)."""
    page_table = jnp.asarray(page_table)
    s, p = page_table.shape
    page = k_cache.shape[2]
    p2 = table_width(p, page)
    if p < p2:  # extra pages are masked by the lengths, never read
        page_table = jnp.pad(page_table, ((0, 0), (0, p2 - p)))
        p = p2
    k_splits, ppcb = partition(k_cache.shape[0], s, p, page, sizes)
    if impl == "gqa":
        return gqa_decode_attention(q, k_cache, v_cache, page_table, seq_lens, scale=scale,
                                    k_splits=k_splits, pages_per_block=ppcb,
                                    num_warps=sizes.num_warps,
                                    num_stages=sizes.gqa_num_stages,
                                    interpret=interpret)
    if impl != "jax":
        raise ValueError(f"decode kernel {impl!r}: expected 'jax' or 'gqa'")
    if is_fp8_kv(k_cache.dtype):
        raise ValueError("JAX's paged_attention (decode_impl jax) does not read an fp8 KV "
                         "cache; use decode_impl gqa (the default)")
    o = paged_attention(
        (q * scale).astype(k_cache.dtype), k_cache, v_cache, page_table,
        jnp.asarray(seq_lens, jnp.int32), block_h=sizes.block_h, pages_per_compute_block=ppcb,
        k_splits=k_splits, num_warps=sizes.num_warps, num_stages=sizes.num_stages,
        interpret=interpret)
    return o.astype(q.dtype)
