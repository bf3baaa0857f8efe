"""An fp8 KV cache (--kv-cache-dtype fp8: float8_e4m3fn, scale 1): written clipped, read upcast
by the GPU's decode and ragged kernels (Pallas interpreter here, Triton on a GPU) and by the
CPU oracle, on the same e4m3 values; and the pool holds twice the tokens of a bf16 one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.cuda.backend import CudaBackend
from engine.attention import write_kv
from engine.builder import kv_cache_dtype, kv_pages
from engine.config import EngineConfig
from tests.backends.ragged_batches import fp8_step
from tests.engine.test_kv_sizing import CFG, PER_PAGE, FixedMemory

ON_GPU = jax.default_backend() == "gpu"
F8 = jnp.float8_e4m3fn
REL_TOL = 1e-2 if ON_GPU else 1e-5  # the GPU's dots take bf16 q against the upcast K/V


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [9, 1, 4]])
def test_kernels_read_fp8_cache_like_the_oracle(q_lens):
    """Decode-only (the decode kernel) and mixed (the ragged kernel with the decode kernel
    for its decodes) steps over an e4m3 cache; the oracle reads the same cache upcast."""
    case, md, kh, vh = fp8_step(q_lens)
    q = jnp.asarray(case.q, jnp.bfloat16 if ON_GPU else jnp.float32)
    be = CudaBackend({"interpret": not ON_GPU})
    got = np.asarray(be.attention(q, kh, vh, md, scale=32**-0.5), np.float32)
    want = np.asarray(oracle(q, kh, vh, md, scale=32**-0.5, head_major=True), np.float32)
    n = case.num_tokens
    err = np.linalg.norm(got[:n] - want[:n]) / np.linalg.norm(want[:n])
    assert err < REL_TOL
    # The e4m3 cache is not the float32 one (about 3% apart here, measured 2026-12-03): the
    # check above compares like with like, more tightly than that gap.
    exact = np.asarray(oracle(q, jnp.asarray(case.k_cache.transpose(2, 0, 1, 3)),
                              jnp.asarray(case.v_cache.transpose(2, 0, 1, 3)), md,
                              scale=32**-0.5, head_major=True), np.float32)
    gap = np.linalg.norm(exact[:n] - want[:n]) / np.linalg.norm(exact[:n])
    assert gap > 1e-2 and gap > 2 * REL_TOL, gap


def test_fp8_writes_clip_and_round():
    """K/V past e4m3's range are stored as +-448 (a plain cast would make NaN), the rest
    rounded to e4m3, in both layouts (the GPU's head-major write and the default one)."""
    kv = np.array([[[1000.0, -1000.0, 0.3, -2.5]]], np.float32)  # [T=1, Hkv=1, D=4]
    want = np.array([448.0, -448.0, 0.3, -2.5], np.float32).astype(F8).astype(np.float32)
    slots = jnp.array([5])
    cache = jnp.zeros((1, 2, 4, 4), F8)  # [Hkv, pages, page, D]
    kh, vh = CudaBackend({"interpret": True}).write_kv(cache, cache, kv, kv, slots)
    np.testing.assert_array_equal(np.asarray(kh[0, 1, 1], np.float32), want)
    flat = jnp.zeros((2, 4, 1, 4), F8)  # [pages, page, Hkv, D]
    k2, _ = write_kv(flat, flat, kv, kv, slots)
    np.testing.assert_array_equal(np.asarray(k2[1, 1, 0], np.float32), want)


def test_fp8_pool_holds_twice_the_tokens():
    config = EngineConfig.build(kv_cache_dtype="fp8", kv_memory_fraction=0.5)
    mem = FixedMemory(1000 * PER_PAGE)  # PER_PAGE: a bf16 page
    bf16 = kv_pages(config, CFG, mem, kv_cache_dtype("auto", jnp.dtype(jnp.bfloat16)).itemsize)
    fp8 = kv_pages(config, CFG, mem, kv_cache_dtype("fp8", jnp.dtype(jnp.bfloat16)).itemsize)
    assert (bf16, fp8) == (500, 1000)


def test_unknown_kv_cache_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or fp8, got 'int8'"):
        EngineConfig.build(kv_cache_dtype="int8")
