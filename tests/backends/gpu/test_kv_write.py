"""One K/V write per layer (backends/gpu/kernels/kv_write.py, Pallas interpreter here): the
caches equal the two scatters of the reference (engine.attention.write_kv in the head-major
layout), bf16 and fp8 caches, padding slots dropped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.gpu.backend import TritonBackend
from backends.gpu.kernels import kv_write
from engine.attention import write_kv

HKV, PAGES, PAGE, D = 2, 6, 4, 32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_one_kernel_writes_k_and_v_like_the_oracle(dtype):
    rng = np.random.default_rng(0)
    k0, v0 = (rng.standard_normal((HKV, PAGES, PAGE, D)).astype(np.float32) for _ in range(2))
    t = 7
    k, v = (jnp.asarray(300 * rng.standard_normal((t, HKV, D)), jnp.bfloat16) for _ in range(2))
    # tokens in two pages out of order, a page's last slot, and two padding tokens (slots
    # past the cache: dropped)
    slots = jnp.asarray([9, 10, 11, 0, 23, PAGES * PAGE, PAGES * PAGE + 5], jnp.int32)
    kc, vc = jnp.asarray(k0, dtype), jnp.asarray(v0, dtype)
    got = kv_write.write_kv(kc, vc, k, v, slots, interpret=True)
    # the oracle's layout [pages, page, Hkv, D]
    want = write_kv(kc.transpose(1, 2, 0, 3), vc.transpose(1, 2, 0, 3), k, v, slots)
    for g, w, old in zip(got, want, (kc, vc), strict=True):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32),
                                      np.asarray(w.transpose(2, 0, 1, 3), np.float32))
        assert not np.array_equal(np.asarray(g, np.float32), np.asarray(old, np.float32))
    if dtype == jnp.float8_e4m3fn:  # clipped to +-448 like every fp8 write
        assert np.abs(np.asarray(got[0], np.float32)).max() == 448


def test_backend_takes_the_kernel_unless_told_or_unsupported():
    rng = np.random.default_rng(1)
    kc = jnp.asarray(rng.standard_normal((HKV, PAGES, PAGE, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, HKV, D)), jnp.float32)
    slots = jnp.asarray([1, 5, 30], jnp.int32)
    backends = [TritonBackend({"interpret": True, "kv_write": w}) for w in ("pallas", "xla")]
    outs = [be.write_kv(kc, kc, k, k, slots) for be in backends]
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    traces = [str(jax.make_jaxpr(be.write_kv)(kc, kc, k, k, slots)) for be in backends]
    assert traces[0].count("pallas_call[") == 1 and "scatter[" not in traces[0]
    assert "pallas_call[" not in traces[1] and traces[1].count("scatter[") == 2
    assert not kv_write.supported(3, 32) and not kv_write.supported(2, 48)
    with pytest.raises(ValueError, match="kv_write='scatter'"):
        TritonBackend({"interpret": True, "kv_write": "scatter"})
