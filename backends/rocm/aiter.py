"""AITER (AMD's operator library) behind the backend contract, through `jax.ffi`.

Three ops: decode paged attention (AITER's `paged_attention_ragged`), prompt attention
(`flash_attn_varlen_func`, causal, over K/V gathered from the pages) and the fused residual
add + RMSNorm (`rmsnorm2d_fwd_with_add`). Each has two halves:

- the layout conversion from ours to AITER's arguments, plain JAX (tested on any host
  against the CPU oracle through a reference that reads AITER's layout:
  tests/backends/rocm/test_aiter_layout.py);
- the call, `jax.ffi.ffi_call` of a target registered for platform ROCM. The handlers are
  C++ over AITER's kernels (as ROCm's jax-aiter builds them), loaded from a shared library
  by `register_handlers`; this repository does not build that library (no ROCm here).

Our cache is head-major [Hkv, pages, page, D]; AITER's ragged paged attention reads "HND"
pages [pages, Hkv, page, D], so the decode path transposes each layer's cache per call: a
full copy of the cache. That makes it a correctness path until the backend keeps its cache
in AITER's layout; the Triton kernels stay the default (`decode_op`/`prefill_op: triton`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp

from engine.attention import AttentionMetadata

TARGETS = {
    "decode": "engine_aiter_paged_attention_ragged",
    "prefill": "engine_aiter_flash_attn_varlen",
    "rmsnorm": "engine_aiter_rmsnorm2d_fwd_with_add",
}
"""FFI target names, one per op; the handler library exports each as a C symbol of the same
name (an XLA FFI handler)."""

_registered: set[str] = set()


def aiter_importable() -> bool:
    return importlib.util.find_spec("aiter") is not None


def register_handlers(library: str) -> list[str]:
    """Register the handlers `library` (a shared object path) exports for platform ROCM;
    returns the ops now callable."""
    lib = ctypes.CDLL(library)
    for target in TARGETS.values():
        fn = getattr(lib, target, None)
        if fn is not None and target not in _registered:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="ROCM")
            _registered.add(target)
    return [op for op, target in TARGETS.items() if target in _registered]


def available(op: str) -> bool:
    """Whether `op` can run through AITER here: aiter importable and its handler registered."""
    return aiter_importable() and TARGETS[op] in _registered


# -- decode: ragged paged attention --------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["indptr", "indices", "last_page_lens"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RaggedPages:
    """AITER's ragged page list (as SGLang's ROCm backend builds it): sequence s reads pages
    indices[indptr[s]:indptr[s+1]], the last of them holding last_page_lens[s] tokens."""

    indptr: jax.Array  # i32 [S + 1]
    indices: jax.Array  # i32 [S * P]: each sequence's pages, packed; the tail is unused
    last_page_lens: jax.Array  # i32 [S]


def ragged_pages(page_table: jax.Array, seq_lens: jax.Array, page: int) -> RaggedPages:
    """Our page table [S, P] and lengths [S] -> AITER's packed list. A sequence of length
    0 owns no pages (its output is whatever AITER writes for it; the caller masks it)."""
    page_table = jnp.asarray(page_table, jnp.int32)
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    s, p = page_table.shape
    n_pages = -(-seq_lens // page)  # [S]
    indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n_pages).astype(jnp.int32)])
    flat = jnp.arange(s * p, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(indptr, flat, side="right") - 1, 0, s - 1)
    j = flat - indptr[seq]  # page index within its sequence
    live = flat < indptr[-1]
    indices = jnp.where(live, page_table[seq, jnp.clip(j, 0, p - 1)], 0)
    last = jnp.where(seq_lens > 0, seq_lens - (n_pages - 1) * page, 0)
    return RaggedPages(indptr, indices, last.astype(jnp.int32))


def hnd_cache(cache: jax.Array) -> jax.Array:
    """Ours [Hkv, pages, page, D] -> AITER's "HND" [pages, Hkv, page, D] (a copy)."""
    return jnp.swapaxes(cache, 0, 1)


def paged_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 md: AttentionMetadata, *, scale: float) -> jax.Array:
    """A decode-only step through AITER: q [T, Hq, D] (token i = sequence i) -> [T, Hq, D]."""
    s = md.page_table.shape[0]
    t, hq, d = q.shape
    qs = q[:s] if t >= s else jnp.pad(q, ((0, s - t), (0, 0), (0, 0)))  # [S, Hq, D]
    pages = ragged_pages(md.page_table, md.seq_lens, md.page_size)
    o = jax.ffi.ffi_call(TARGETS["decode"], jax.ShapeDtypeStruct(qs.shape, qs.dtype))(
        qs, hnd_cache(k_cache), hnd_cache(v_cache), pages.indptr, pages.indices,
        pages.last_page_lens, scale=float(scale), page_size=int(md.page_size),
        kv_cache_layout="HND")
    o = jnp.where((jnp.asarray(md.seq_lens) > 0)[:, None, None], o, 0)
    return o[:t] if t <= s else jnp.pad(o, ((0, t - s), (0, 0), (0, 0)))


# -- prompt: variable-length flash attention -----------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "cu_seqlens_q", "cu_seqlens_k"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class VarlenInputs:
    """flash_attn_varlen_func's K/V side: each sequence's K/V rows packed in order."""

    k: jax.Array  # [S * P * page, Hkv, D]; rows past cu_seqlens_k[S] are padding
    v: jax.Array
    cu_seqlens_q: jax.Array  # i32 [S + 1]: our query_start
    cu_seqlens_k: jax.Array  # i32 [S + 1]: prefix sums of seq_lens


def varlen_inputs(k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata
                  ) -> VarlenInputs:
    """Gather every sequence's first seq_lens[s] cached tokens into packed K/V. Causal
    masking is bottom-right aligned (a sequence's queries are its last q_len tokens), which
    is how flash-attention's varlen causal mode treats q_len < k_len."""
    page_table = jnp.asarray(md.page_table, jnp.int32)
    seq_lens = jnp.asarray(md.seq_lens, jnp.int32)
    hkv, num_pages, page, d = k_cache.shape
    s, p = page_table.shape
    cu_k = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_lens).astype(jnp.int32)])
    row = jnp.arange(s * p * page, dtype=jnp.int32)  # [Tk]
    seq = jnp.clip(jnp.searchsorted(cu_k, row, side="right") - 1, 0, s - 1)
    pos = jnp.clip(row - cu_k[seq], 0, p * page - 1)
    slot = page_table[seq, pos // page] * page + pos % page  # [Tk]
    k_rows = k_cache.reshape(hkv, num_pages * page, d)[:, slot].swapaxes(0, 1)  # [Tk, Hkv, D]
    v_rows = v_cache.reshape(hkv, num_pages * page, d)[:, slot].swapaxes(0, 1)
    return VarlenInputs(k_rows, v_rows, jnp.asarray(md.query_start, jnp.int32), cu_k)


def prompt_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     md: AttentionMetadata, *, scale: float) -> jax.Array:
    """A mixed step through AITER's varlen flash attention: q [T, Hq, D] -> [T, Hq, D];
    padding tokens (at or past query_start[S]) come out zero."""
    x = varlen_inputs(k_cache, v_cache, md)
    s, p = md.page_table.shape
    o = jax.ffi.ffi_call(TARGETS["prefill"], jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_k, scale=float(scale), causal=True,
        max_seqlen_q=int(q.shape[0]), max_seqlen_k=int(p * md.page_size))
    real = jnp.arange(q.shape[0]) < jnp.asarray(md.query_start)[-1]
    return jnp.where(real[:, None, None], o, 0)


# -- fused residual add + RMSNorm ----------------------------------------------------------

def fused_add_rms_norm_reference(x: jax.Array, residual: jax.Array, weight: jax.Array,
                                 eps: float) -> tuple[jax.Array, jax.Array]:
    """(rms_norm(x + residual) * weight, x + residual), float32 inside: what AITER's
    rmsnorm2d_fwd_with_add computes; the fallback where AITER is absent."""
    h = x.astype(jnp.float32) + residual.astype(jnp.float32)  # [T, E]
    y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype), h.astype(x.dtype)


def fused_add_rms_norm(x: jax.Array, residual: jax.Array, weight: jax.Array,
                       eps: float) -> tuple[jax.Array, jax.Array]:
    """x, residual [T, E], weight [E] -> (normed [T, E], new residual [T, E]): AITER where
    its handler is registered, else the plain-JAX reference."""
    if not available("rmsnorm"):
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return tuple(jax.ffi.ffi_call(TARGETS["rmsnorm"], (out, out))(
        x, residual, weight, epsilon=float(eps)))
