"""Random mixed ragged batches over a paged KV cache, and a dense numpy reference.

Shared by every backend's kernel tests: each kernel must equal the CPU oracle, and the
oracle must equal plain dense causal attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from engine.attention import AttentionMetadata


@dataclasses.dataclass
class RaggedCase:
    q: np.ndarray  # [T, Hq, D]
    k_cache: np.ndarray  # [num_pages, page, Hkv, D], holding every sequence's K
    v_cache: np.ndarray
    md: AttentionMetadata
    expected: np.ndarray  # [T, Hq, D], dense causal attention per sequence
    num_tokens: int


def make_case(rng: np.random.Generator, *, kv_lens: list[int], q_lens: list[int],
              page_size: int, hq: int, hkv: int, d: int, pad_tokens: int = 16,
              pad_seqs: int = 0, extra_pages: int = 3, dtype=np.float32) -> RaggedCase:
    """Sequence s has kv_lens[s] tokens of K/V; its last q_lens[s] tokens are this step's
    queries (q_len 1 is a decode, q_len == kv_len a fresh prompt, else a chunk extending
    a cached prefix). Pages are assigned in shuffled order so the table matters."""
    pages_per = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per) + extra_pages
    perm = rng.permutation(num_pages)
    k_cache = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
    v_cache = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
    n_tok = sum(q_lens)
    t = -(-max(n_tok, 1) // pad_tokens) * pad_tokens
    s_pad = len(kv_lens) + pad_seqs
    max_p = max(pages_per)
    q = rng.standard_normal((t, hq, d)).astype(dtype)
    positions = np.zeros(t, np.int32)
    token_seq = np.zeros(t, np.int32)
    slots = np.full(t, num_pages * page_size, np.int32)
    query_start = np.full(s_pad + 1, n_tok, np.int32)
    seq_lens = np.zeros(s_pad, np.int32)
    page_table = np.zeros((s_pad, max_p), np.int32)
    expected = np.zeros_like(q)
    off, next_page = 0, 0
    scale = d**-0.5
    for s, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens, strict=True)):
        pages = perm[next_page:next_page + pages_per[s]]
        next_page += pages_per[s]
        page_table[s, :len(pages)] = pages
        seq_lens[s] = kv_len
        query_start[s] = off
        pos = np.arange(kv_len - q_len, kv_len)
        positions[off:off + q_len] = pos
        token_seq[off:off + q_len] = s
        slots[off:off + q_len] = pages[pos // page_size] * page_size + pos % page_size
        k = k_cache[pages].reshape(-1, hkv, d)[:kv_len].astype(np.float64)
        v = v_cache[pages].reshape(-1, hkv, d)[:kv_len].astype(np.float64)
        for i, p in enumerate(pos):
            qi = q[off + i].astype(np.float64).reshape(hkv, hq // hkv, d)
            sc = np.einsum("kgd,nkd->kgn", qi, k[:p + 1]) * scale
            w = np.exp(sc - sc.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            expected[off + i] = np.einsum("kgn,nkd->kgd", w, v[:p + 1]).reshape(hq, d)
        off += q_len
    md = AttentionMetadata(
        positions=positions, slot_mapping=slots, token_seq=token_seq, query_start=query_start,
        seq_lens=seq_lens, page_table=page_table, num_tokens=np.int32(n_tok),
        page_size=page_size)
    return RaggedCase(q, k_cache, v_cache, md, expected, n_tok)


def fp8_step(q_lens: list[int], dtype: Any = jnp.float8_e4m3fn):
    """A decode-only (all q_lens 1: page table padded to the runner's bucket) or mixed step's
    case and metadata, with its K and V caches head-major in the fp8 `dtype`."""
    rng = np.random.default_rng(len(q_lens) + sum(q_lens))
    case = make_case(rng, kv_lens=[20, 5, 33], q_lens=q_lens, page_size=8, hq=8, hkv=2, d=32)
    md = case.md
    if max(q_lens) == 1:
        pt = md.page_table
        p = 1 << (pt.shape[1] - 1).bit_length()  # as the runner's page buckets
        md = dataclasses.replace(md, page_table=np.pad(pt, ((0, 0), (0, p - pt.shape[1]))),
                                 decode_only=True)
    kh, vh = (jnp.asarray(np.ascontiguousarray(c.transpose(2, 0, 1, 3))).astype(dtype)
              for c in (case.k_cache, case.v_cache))
    return case, md, kh, vh
