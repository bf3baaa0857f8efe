"""Ragged paged attention in plain jax.numpy: the oracle every accelerator kernel is tested against.

Each token attends to the K/V of its own sequence at positions <= its own position.
Simple on purpose: gather the token's pages, mask, softmax. Tokens are processed in
chunks so the gathered K/V stays bounded ([C, P * page, Hkv, D] per chunk).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from engine.attention import AttentionMetadata, is_fp8_kv

TOKEN_CHUNK = 64


def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    md: AttentionMetadata,
    *,
    scale: float,
    layer: jax.Array | None = None,
    head_major: bool = False,
) -> jax.Array:
    """q [T, Hq, D]; k_cache, v_cache [num_pages, page, Hkv, D] -> [T, Hq, D].

    With `layer`, the caches hold every layer ([L, num_pages, page, Hkv, D]) and this
    layer's pages are gathered directly (no copy of the layer's cache). With `head_major`
    the cache is [Hkv, num_pages, page, D] (the GPU decode kernel's layout)."""
    t, hq, d = q.shape
    hkv = k_cache.shape[-4] if head_major else k_cache.shape[-2]
    lead = () if layer is None else (layer,)

    def gather(cache, pages):  # pages: [C, P] -> [C, P * page, Hkv, D]
        if head_major:
            blocks = cache[(*lead, slice(None), pages)]  # [Hkv, C, P, page, D]
            return jnp.moveaxis(blocks, 0, -2).reshape(pages.shape[0], -1, hkv, d)
        return cache[(*lead, pages)].reshape(pages.shape[0], -1, hkv, d)
    g = hq // hkv
    k_cache, v_cache, page_table = map(jnp.asarray, (k_cache, v_cache, md.page_table))
    seq_lens = jnp.asarray(md.seq_lens)[md.token_seq]  # [T]

    def attend(args):
        qc, pos, seq, kv_len = args  # qc: [C, Hq, D]
        pages = page_table[seq]  # [C, P]
        c = qc.shape[0]
        k = gather(k_cache, pages)  # k: [C, K, Hkv, D], K = P * page
        v = gather(v_cache, pages)
        if is_fp8_kv(k.dtype):  # an fp8 cache (scale 1; e4m3fn, or fnuz on ROCm): read upcast
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        qg = qc.reshape(c, hkv, g, d)
        s = jnp.einsum("ckgd,cnkd->ckgn", qg, k, preferred_element_type=jnp.float32) * scale
        kv_pos = jnp.arange(k.shape[1])
        valid = (kv_pos[None, :] <= pos[:, None]) & (kv_pos[None, :] < kv_len[:, None])
        s = jnp.where(valid[:, None, None, :], s, -1e30)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("ckgn,cnkd->ckgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(c, hq, d).astype(q.dtype)

    c = math.gcd(t, TOKEN_CHUNK)
    chunks = (x.reshape(t // c, c, *x.shape[1:]) for x in (q, md.positions, md.token_seq, seq_lens))
    return jax.lax.map(attend, tuple(chunks)).reshape(t, hq, d)
