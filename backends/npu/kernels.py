"""The fused ops the NPU backend uses, as torch_npu provides them, and a plain-torch
reference of each with the same signature and cache layout, used where torch_npu is absent
(`--npu-device cpu`) and as the oracle of the fused ops.

Cache layout (torch_npu's paged ops): [blocks, block_size, kv_heads, head_dim]; the NPU
backend allocates one extra block at the end that padding tokens write to and no
sequence reads, so that no slot is ever out of range (the fused write has no drop mode).

Shape letters: T tokens (packed sequences), B sequences, P blocks per sequence,
Hq / Hkv query / KV heads, D head dim.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch

TOKEN_CHUNK = 64  # the references attend this many tokens at a time (bounded gathers)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
    """In place: key/value [T, Hkv, D] to flat slots [T] (block * block_size + offset).
    Slots past the cache are dropped (the fused op has none: see the module docstring)."""
    kc, vc = key_cache.view(-1, *key_cache.shape[2:]), value_cache.view(-1, *value_cache.shape[2:])
    ok = (slot_indices >= 0) & (slot_indices < kc.shape[0])
    slots = slot_indices.to(torch.int64)[ok]
    kc.index_copy_(0, slots, key[ok].to(kc.dtype))
    vc.index_copy_(0, slots, value[ok].to(vc.dtype))


def _attend(query, key_cache, value_cache, block_table, q_lens, kv_lens, scale, out) -> None:
    """The reference core: packed queries [T, Hq, D]; sequence b has q_lens[b] queries, the
    last ones of its kv_lens[b] tokens, each seeing the tokens up to its own (causal,
    bottom-right aligned). Rows past sum(q_lens) get zeros."""
    t, hq, d = query.shape
    hkv = key_cache.shape[2]
    g = hq // hkv
    dev = query.device
    q_lens, kv_lens = q_lens.to(dev, torch.int64), kv_lens.to(dev, torch.int64)
    ends = torch.cumsum(q_lens, 0)  # [B]
    tok = torch.arange(t, device=dev)
    seq = torch.searchsorted(ends, tok, right=True).clamp(max=q_lens.shape[0] - 1)  # [T]
    real = tok < ends[-1]
    pos = kv_lens[seq] - (ends[seq] - tok)  # [T] position of each query
    for c0 in range(0, t, TOKEN_CHUNK):
        sl = slice(c0, min(t, c0 + TOKEN_CHUNK))
        pages = block_table[seq[sl]].to(torch.int64)  # [C, P]
        c = pages.shape[0]
        k = key_cache[pages].reshape(c, -1, hkv, d).float()  # [C, P * block, Hkv, D]
        v = value_cache[pages].reshape(c, -1, hkv, d).float()
        qg = query[sl].reshape(c, hkv, g, d).float()
        s = torch.einsum("ckgd,cnkd->ckgn", qg, k) * scale
        kv_pos = torch.arange(k.shape[1], device=dev)
        valid = (kv_pos[None, :] <= pos[sl, None]) & (kv_pos[None, :] < kv_lens[seq[sl], None])
        valid = valid & real[sl, None]
        s = s.masked_fill(~valid[:, None, None, :], -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing to see: zeros
        o = torch.einsum("ckgn,cnkd->ckgd", p.to(v.dtype), v)
        out[sl] = o.reshape(c, hq, d).to(out.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    num_kv_heads: int, num_heads: int, scale_value: float,
                    block_table: torch.Tensor, context_lens: torch.Tensor, out: torch.Tensor
                    ) -> None:
    """Decode: one query [B, Hq, D] per sequence, its context_lens[b] tokens in the blocks
    block_table [B, P]; writes out [B, Hq, D] (torch_npu._npu_paged_attention)."""
    assert key_cache.shape[2] == num_kv_heads and query.shape[1] == num_heads
    ones = torch.ones_like(context_lens)
    _attend(query, key_cache, value_cache, block_table, ones, context_lens, scale_value, out)


def flash_attention_qlens(query: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, block_table: torch.Tensor, mask: Any,
                          seq_len: torch.Tensor, context_lens: torch.Tensor, num_kv_heads: int,
                          num_heads: int, scale_value: float, out: torch.Tensor) -> None:
    """Prompt chunks over cached prefixes: seq_len[b] packed queries of sequence b, the
    last of its context_lens[b] tokens (torch_npu._npu_flash_attention_qlens); causal.
    `mask` is the fused op's causal mask tensor; the reference builds its own."""
    assert key_cache.shape[2] == num_kv_heads and query.shape[1] == num_heads
    _attend(query, key_cache, value_cache, block_table, seq_len, context_lens, scale_value, out)


def reference_ops() -> SimpleNamespace:
    return SimpleNamespace(name="reference", reshape_and_cache=reshape_and_cache,
                           paged_attention=paged_attention,
                           flash_attention_qlens=flash_attention_qlens, mask=lambda *a: None)


def npu_ops() -> SimpleNamespace:
    """torch_npu's fused ops with the references' signatures (imported only here)."""
    import torch_npu  # noqa: F401  (needs the CANN libraries: see backends/npu/device.py)

    def mask(max_len: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        # the fused chunked-prefill op takes a causal mask (upper triangle masked)
        m = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool, device=device), 1)
        return torch.zeros(max_len, max_len, dtype=dtype, device=device).masked_fill(
            m, torch.finfo(dtype).min)

    return SimpleNamespace(
        name="torch_npu",
        reshape_and_cache=lambda key, value, key_cache, value_cache, slot_indices:
            torch.ops.npu._npu_reshape_and_cache(key=key, value=value, key_cache=key_cache,
                                                 value_cache=value_cache,
                                                 slot_indices=slot_indices),
        paged_attention=lambda query, key_cache, value_cache, num_kv_heads, num_heads,
            scale_value, block_table, context_lens, out: torch.ops.npu._npu_paged_attention(
                query=query, key_cache=key_cache, value_cache=value_cache,
                num_kv_heads=num_kv_heads, num_heads=num_heads, scale_value=scale_value,
                block_table=block_table, context_lens=context_lens.cpu(), out=out),
        flash_attention_qlens=lambda query, key_cache, value_cache, block_table, mask, seq_len,
            context_lens, num_kv_heads, num_heads, scale_value, out:
            torch.ops.npu._npu_flash_attention_qlens(
                query=query, key_cache=key_cache, value_cache=value_cache,
                block_table=block_table, mask=mask, seq_len=seq_len.cpu(),
                context_lens=context_lens.cpu(), num_kv_heads=num_kv_heads,
                num_heads=num_heads, scale_value=scale_value, out=out),
        mask=mask,
    )


def make_attention(ops: SimpleNamespace, *, scale: float, page_size: int, decode_only: bool,
                   layered: bool):
    """The executor's function for an npu_attention equation (calls.py's operand order)."""
    def run(q, k_cache, v_cache, positions, slot_mapping, token_seq, query_start, seq_lens,
            page_table, num_tokens, *layer):
        if layered:
            li = int(layer[0])  # a view (a tensor index would copy); reads the index
            k_cache, v_cache = k_cache.select(0, li), v_cache.select(0, li)
        t, hq, _ = q.shape
        hkv = k_cache.shape[2]
        out = torch.zeros_like(q)
        if decode_only:  # token i is sequence i's one query; rows past the sequences: pad
            b = seq_lens.shape[0]
            ops.paged_attention(q[:b].contiguous(), k_cache, v_cache, hkv, hq, scale,
                                page_table, seq_lens, out[:b])
        else:
            q_lens = query_start[1:] - query_start[:-1]
            m = ops.mask(page_table.shape[1] * page_size, q.dtype, q.device)
            ops.flash_attention_qlens(q, k_cache, v_cache, page_table, m, q_lens, seq_lens,
                                      hkv, hq, scale, out)
        return out
    return run


def make_write_kv(ops: SimpleNamespace, *, layered: bool):
    """The executor's function for an npu_write_kv equation: in place, the caches returned
    (the step's KV cache is donated: nothing reads the old contents afterwards)."""
    def run(k_cache, v_cache, k, v, slots, *layer):
        kc, vc = k_cache, v_cache
        if layered:  # views of the layer (a tensor index would copy)
            kc, vc = k_cache.select(0, int(layer[0])), v_cache.select(0, int(layer[0]))
        ops.reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, slots.to(torch.int32))
        return [k_cache, v_cache]
    return run
