"""Decode attention with a KV head's query heads in one program: our Pallas (Triton) kernel.

An alternative to JAX's paged_attention (kernels/paged_decode.py), built to cut what the
batch-1 profile showed around it: a pad of the G query heads of a KV head to 16 rows, a
scale and convert of q, and a bf16 split combine, each its own kernel per layer. Here:

- one program per (KV head, sequence, split) loads the G query rows of its KV head from q
  as it is ([S * Hq, D], rows past G masked), scales them, and walks its split of the
  sequence's K/V in blocks of `pages_per_block` pages gathered row by row through the page
  table (a plain [BK, D] tile for the dot, no reshape); only the last block is masked;
- a sequence's splits divide its own length, not the table's width (`split_tokens`): with
  one table width for every step (page buckets 'max'), a batch-1 step at 1k tokens of an
  8k-token table still spreads its blocks over all splits, and splits past the length
  exit at once (their partial rows are ignored by the combine);
- with one split it writes the final rows; with more it writes float32 partial rows and
  their log-sum-exp, and one XLA fusion combines them.

Reference: backends.cpu.attention.ragged_paged_attention (head_major=True); the tests
compare both this and JAX's kernel with it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from backends.gpu.kernels.flash import MASK_VALUE, compute_dtype, online_softmax_step
from backends.gpu.kernels.fp8 import upcast

MIN_ROWS = 16
"""Triton's dot needs 16 rows: the G query rows of a KV head are padded to this, masked."""


def split_tokens(length, k_splits: int, block_k: int):
    """Tokens of a sequence's context each of its k_splits splits takes: the length divided
    evenly, rounded up to whole blocks of block_k tokens (so only the last block of the
    sequence is masked). Splits from cdiv(length, this) on are empty. Works on Python ints
    and on the kernel's int32 scalars alike."""
    per_split = (length + k_splits - 1) // k_splits
    return (per_split + block_k - 1) // block_k * block_k


def _kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, scale: float, hq: int,
            g: int, rows: int, page: int, pages_per_block: int, k_splits: int, pages: int):
    # len_ref [1]; pt_ref [S * P]; q_ref, o_ref [S * Hq, D]; k_ref, v_ref [pages * page, D];
    # lse_ref: [S * Hq] when there are splits.
    h, s, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d = k_ref.shape[1]
    block_k = pages_per_block * page
    row0 = s * hq + h * g
    row_ok = jnp.arange(rows) < g  # [R]
    tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, d))  # [R, D]
    q = plgpu.load(q_ref.at[pl.ds(row0, rows), :], mask=tile_ok, other=0)
    cdt = compute_dtype(k_ref.dtype, q_ref.dtype)  # float8 K/V: upcast to q's type
    q = (q.astype(jnp.float32) * (scale * math.log2(math.e))).astype(cdt)
    length = len_ref[0]
    # Blocks never cross the table's end: pages is a multiple of pages_per_block, and every
    # split starts on a block boundary.
    per_split = split_tokens(length, k_splits, block_k)
    start = split * per_split
    n_tok = jnp.clip(length - start, 0, per_split)
    pt_base = s * pages

    def step(j, carry, masked: bool):  # carry: output [R, D], max [R], sum [R]
        kv_pos = start + j * block_k + jnp.arange(block_k)  # [BK]
        slots = pt_ref[pt_base + lax.div(kv_pos, page)] * page + lax.rem(kv_pos, page)
        k = upcast(k_ref[slots, :], cdt)  # [BK, D]
        v = upcast(v_ref[slots, :], cdt)
        sc = plgpu.dot(q, k, trans_b=True)  # [R, BK]
        if masked:
            sc = jnp.where((kv_pos < length)[None, :], sc, MASK_VALUE)
        return online_softmax_step(carry, sc, v)

    n_full = lax.div(n_tok, block_k)
    n_all = lax.div(n_tok + block_k - 1, block_k)
    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, denom = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
    safe = jnp.where(denom > 0, denom, 1.0)
    plgpu.store(o_ref.at[pl.ds(row0, rows), :], (acc / safe[:, None]).astype(o_ref.dtype),
                mask=tile_ok)
    if lse_ref:  # log2-sum-exp2 of the split's scores; MASK_VALUE for an empty split
        lse = jnp.where(denom > 0, m + jnp.log2(safe), MASK_VALUE)
        plgpu.store(lse_ref[0].at[pl.ds(row0, rows)], lse, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("scale", "k_splits", "pages_per_block",
                                             "num_warps", "num_stages", "interpret"))
def gqa_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         page_table: jax.Array, seq_lens: jax.Array, *, scale: float,
                         k_splits: int, pages_per_block: int, num_warps: int = 4,
                         num_stages: int = 1, interpret: bool = False) -> jax.Array:
    """q [S, Hq, D], one query per sequence over its first seq_lens [S] tokens of the
    caches [Hkv, pages, page, D] through page_table [S, P] -> [S, Hq, D]. P must be a
    multiple of pages_per_block (blocks of >= 16 tokens); each sequence's length is split
    over k_splits programs (split_tokens), whatever P is."""
    s, hq, d = q.shape
    hkv, num_pages, page, _ = k_cache.shape
    p = page_table.shape[1]
    if hq % hkv or p % pages_per_block or k_splits < 1:
        raise ValueError(f"q {q.shape}, cache {k_cache.shape}, table {page_table.shape}: "
                         f"{k_splits} splits of {pages_per_block}-page blocks do not fit")
    g = hq // hkv
    rows = max(MIN_ROWS, 1 << (g - 1).bit_length())
    kernel = functools.partial(_kernel, scale=scale, hq=hq, g=g, rows=rows, page=page,
                               pages_per_block=pages_per_block, k_splits=k_splits,
                               pages=p)
    q_rows = q.reshape(s * hq, d)
    out_dtype = q.dtype if k_splits == 1 else jnp.float32
    row_spec = pl.BlockSpec((None, s * hq, d), lambda h, i, k: (k, 0, 0))
    out_specs = [row_spec]
    out_shape = [jax.ShapeDtypeStruct((k_splits, s * hq, d), out_dtype)]
    if k_splits > 1:
        out_specs.append(pl.BlockSpec((None, s * hq), lambda h, i, k: (k, 0)))
        out_shape.append(jax.ShapeDtypeStruct((k_splits, s * hq), jnp.float32))
    res = pl.pallas_call(
        kernel,
        grid=(hkv, s, k_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda h, i, k: (i,)),  # this sequence's length
            pl.BlockSpec((s * p,), lambda h, i, k: (0,)),  # page table, flat
            pl.BlockSpec((s * hq, d), lambda h, i, k: (0, 0)),  # q rows
            pl.BlockSpec((None, num_pages * page, d), lambda h, i, k: (h, 0, 0)),  # k
            pl.BlockSpec((None, num_pages * page, d), lambda h, i, k: (h, 0, 0)),  # v
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"gqa_decode_ks{k_splits}_bk{pages_per_block * page}",
    )(seq_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), q_rows,
      k_cache.reshape(hkv, num_pages * page, d), v_cache.reshape(hkv, num_pages * page, d))
    if k_splits == 1:
        return res[0][0].reshape(s, hq, d)
    o, lse = res  # [K, S*Hq, D] float32, [K, S*Hq]
    w = jnp.exp2(lse - lse.max(axis=0))  # [K, S*Hq]
    o = (o * w[..., None]).sum(axis=0) / w.sum(axis=0)[:, None]
    return o.reshape(s, hq, d).astype(q.dtype)
