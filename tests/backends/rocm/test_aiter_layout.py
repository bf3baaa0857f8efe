"""AITER's arguments as the ROCm backend builds them from ours: a reference that reads
AITER's layout (numpy, written from AITER's documented argument meanings) must give the
CPU oracle's attention. The calls themselves need an AMD GPU with AITER and its FFI
handlers: marked `rocm`, they skip elsewhere."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.rocm import aiter
from engine.model.llama import rms_norm
from tests.backends.ragged_batches import make_case

PAGE = 16


def head_major(cache):
    return np.ascontiguousarray(cache.transpose(2, 0, 1, 3))  # [Hkv, pages, page, D]


def attend(q, k, v, q_pos, scale):
    """q [n, Hq, D] at positions q_pos [n] over k, v [m, Hkv, D] (positions 0..m-1)."""
    hq, hkv = q.shape[1], k.shape[1]
    qg = q.reshape(q.shape[0], hkv, hq // hkv, -1).astype(np.float64)
    s = np.einsum("nkgd,mkd->nkgm", qg, k.astype(np.float64)) * scale
    s = np.where(np.arange(k.shape[0])[None, None, None, :] <= q_pos[:, None, None, None],
                 s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("nkgm,mkd->nkgd", w, v.astype(np.float64)).reshape(q.shape)


def paged_ragged_reference(q, k_hnd, v_hnd, indptr, indices, last_page_lens, scale):
    """AITER's paged_attention_ragged, one query per sequence: pages [pages, Hkv, page, D]."""
    out = np.zeros(q.shape)
    for s in range(q.shape[0]):
        pages = indices[indptr[s]:indptr[s + 1]]
        if len(pages) == 0:
            continue
        n = (len(pages) - 1) * PAGE + last_page_lens[s]
        k = k_hnd[pages].transpose(0, 2, 1, 3).reshape(-1, *k_hnd.shape[1::2])[:n]
        v = v_hnd[pages].transpose(0, 2, 1, 3).reshape(-1, *v_hnd.shape[1::2])[:n]
        out[s] = attend(q[s:s + 1], k, v, np.array([n - 1]), scale)[0]
    return out


def varlen_reference(q, k, v, cu_q, cu_k, scale):
    """flash_attn_varlen_func, causal (bottom-right: the queries are the last q_len keys)."""
    out = np.zeros(q.shape)
    for s in range(len(cu_q) - 1):
        nq, nk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        if nq:
            out[cu_q[s]:cu_q[s + 1]] = attend(q[cu_q[s]:cu_q[s + 1]], k[cu_k[s]:cu_k[s + 1]],
                                              v[cu_k[s]:cu_k[s + 1]],
                                              np.arange(nk - nq, nk), scale)
    return out


def oracle_out(case, md, scale):
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    return np.asarray(oracle(case.q, kh, vh, md, scale=scale, head_major=True))


def test_ragged_pages_and_hnd_cache_give_the_oracle():
    rng = np.random.default_rng(0)
    case = make_case(rng, kv_lens=[1, 16, 17, 90, 40], q_lens=[1] * 5, page_size=PAGE, hq=8,
                     hkv=2, d=32, pad_seqs=2)
    md = dataclasses.replace(case.md, decode_only=True)
    pages = jax.tree.map(np.asarray, aiter.ragged_pages(md.page_table, md.seq_lens, PAGE))
    lens = np.asarray(md.seq_lens)
    np.testing.assert_array_equal(np.diff(pages.indptr), -(-lens // PAGE))
    np.testing.assert_array_equal(pages.last_page_lens, [1, 16, 1, 10, 8, 0, 0])
    k_hnd = np.asarray(aiter.hnd_cache(head_major(case.k_cache)))
    v_hnd = np.asarray(aiter.hnd_cache(head_major(case.v_cache)))
    assert k_hnd.shape == case.k_cache.transpose(0, 2, 1, 3).shape  # [pages, Hkv, page, D]
    s = lens.shape[0]
    got = paged_ragged_reference(case.q[:s], k_hnd, v_hnd, pages.indptr, pages.indices,
                                 pages.last_page_lens, 0.2)
    want = oracle_out(case, md, 0.2)[:s]
    np.testing.assert_allclose(got[lens > 0], want[lens > 0], rtol=1e-4, atol=1e-5)


def test_varlen_inputs_give_the_oracle():
    """A fresh prompt, a decode, a prefix-extending chunk and padding sequences."""
    rng = np.random.default_rng(1)
    case = make_case(rng, kv_lens=[37, 50, 70], q_lens=[37, 1, 23], page_size=PAGE, hq=4,
                     hkv=1, d=32, pad_seqs=2)
    x = jax.tree.map(np.asarray, aiter.varlen_inputs(head_major(case.k_cache),
                                                     head_major(case.v_cache), case.md))
    np.testing.assert_array_equal(x.cu_seqlens_k, [0, 37, 87, 157, 157, 157])
    assert x.k.shape[0] == case.md.page_table.size * PAGE  # static: S * P * page rows
    got = varlen_reference(case.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_k, 0.3)
    n = case.num_tokens
    np.testing.assert_allclose(got[:n], oracle_out(case, case.md, 0.3)[:n], rtol=1e-4,
                               atol=1e-5)


def test_fused_add_rms_norm_fallback_is_the_models_norm():
    rng = np.random.default_rng(2)
    x, r = rng.standard_normal((2, 5, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    out, res = aiter.fused_add_rms_norm(x, r, w, 1e-6)
    np.testing.assert_allclose(res, x + r, rtol=1e-6)
    np.testing.assert_allclose(out, rms_norm(x + r, w, 1e-6), rtol=1e-5, atol=1e-6)


ON_ROCM = jax.default_backend() == "gpu" and "rocm" in jax.devices()[0].client.platform_version


@pytest.mark.rocm
@pytest.mark.skipif(not (ON_ROCM and aiter.available("decode") and aiter.available("prefill")),
                    reason="needs an AMD GPU with aiter and its FFI handlers registered")
def test_aiter_ops_match_oracle_on_gpu():
    rng = np.random.default_rng(3)
    case = make_case(rng, kv_lens=[300, 40, 70], q_lens=[300, 1, 23], page_size=PAGE, hq=32,
                     hkv=8, d=128, pad_seqs=1)
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    got = np.asarray(aiter.prompt_attention(case.q, kh, vh, case.md, scale=128**-0.5))
    n = case.num_tokens
    err = np.linalg.norm(got[:n] - case.expected[:n]) / np.linalg.norm(case.expected[:n])
    assert err < 1e-2


def test_ffi_calls_lower_for_rocm_with_aiters_operands():
    """The wrappers lower for ROCm on any host (XLA resolves the targets only when it
    compiles on the device): one custom call each, with AITER's operand shapes."""
    import jax.numpy as jnp

    from backends.rocm.triton_check import step_shapes

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    s, p, t = 8, 32, 64
    cache = spec((2, 512, PAGE, 64), jnp.bfloat16)  # ours: [Hkv, pages, page, D]
    q = spec((s, 8, 64), jnp.bfloat16)
    text = jax.jit(lambda q, k, v, md: aiter.paged_decode(q, k, v, md, scale=0.1)).trace(
        q, cache, cache, step_shapes(s, s, p, PAGE, True)).lower(
        lowering_platforms=("rocm",)).as_text()
    call = next(line for line in text.splitlines() if aiter.TARGETS["decode"] in line)
    # q, the HND caches [pages, Hkv, page, D], indptr [S+1], indices [S*P], last lens [S]
    for operand in ("8x8x64xbf16", "512x2x16x64xbf16", "9xi32", f"{s * p}xi32", "8xi32"):
        assert operand in call, (operand, call)
    q = spec((t, 8, 64), jnp.bfloat16)
    text = jax.jit(lambda q, k, v, md: aiter.prompt_attention(q, k, v, md, scale=0.1)
                   ).trace(q, cache, cache, step_shapes(t, s, p, PAGE, False)).lower(
        lowering_platforms=("rocm",)).as_text()
    call = next(line for line in text.splitlines() if aiter.TARGETS["prefill"] in line)
    # q [T, Hq, D], packed K/V [S*P*page, Hkv, D], cu_seqlens_q and _k [S+1]
    for operand in ("64x8x64xbf16", f"{s * p * PAGE}x2x64xbf16", "9xi32"):
        assert operand in call, (operand, call)
