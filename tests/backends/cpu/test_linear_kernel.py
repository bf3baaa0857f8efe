"""The CPU linear kernel equals the plain-JAX reference (engine.model.quant) for every weight
format, at every ISA level this CPU runs (lower levels forced, as ENGINE_CPU_ISA does), and
the GGUF reference equals the gguf package's own dequantization."""

from __future__ import annotations

import logging

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu.backend import CpuBackend
from backends.cpu.kernels import build
from backends.cpu.kernels import linear as kernels
from engine import envs
from engine.model import quant

NATIVE = kernels._native_isa()
LEVELS = list(range(NATIVE + 1))
pytestmark = pytest.mark.skipif(NATIVE < 0, reason="the CPU kernel library is not built here")

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}


def close(got: jnp.ndarray, ref: jnp.ndarray, k: int) -> None:
    # float32 sums of K products in another order: error grows like sqrt(K) * eps * |terms|.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4,
                               atol=1e-5 * np.sqrt(k) * float(np.abs(ref).max() + 1))


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 70),
       fmt=st.sampled_from(["f32", "bf16", "int8"]), seed=st.integers(0, 2**16))
def test_float_and_int8_weights_match_reference(m, k, n, fmt, seed):
    rng = np.random.default_rng(seed)
    w = quant.pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, fmt)  # [K] + [N]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    ref = quant.reference_linear(x, w)
    for isa in LEVELS:
        close(kernels.kernel(x, w, isa), ref, k)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), blocks=st.integers(1, 9), n=st.integers(1, 50),
       fmt=st.sampled_from(sorted(QTYPES)), seed=st.integers(0, 2**16))
def test_gguf_blocks_match_reference_and_gguf(m, blocks, n, fmt, seed):
    rng = np.random.default_rng(seed)
    k = 32 * blocks
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QTYPES[fmt])
    w = quant.from_gguf_rows(raw, fmt, (k,), (n,))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(w)),
                                  gguf.quants.dequantize(raw, QTYPES[fmt]).T)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    ref = quant.reference_linear(x, w)
    for isa in LEVELS:
        close(kernels.kernel(x, w, isa), ref, k)


def test_multi_dim_weight_and_bf16_activations():
    """wo's layout [Hq, D] + [E] (two contracted dims), and bf16 x in, bf16 y out."""
    rng = np.random.default_rng(0)
    w = quant.pack(jnp.asarray(rng.standard_normal((3, 8, 20)), jnp.float32), 2, "int8")
    x = jnp.asarray(rng.standard_normal((5, 3, 8)), jnp.bfloat16)
    y = kernels.kernel(x, w, NATIVE)
    assert y.shape == (5, 20) and y.dtype == jnp.bfloat16
    ref = jnp.einsum("thd,hde->te", x.astype(jnp.float32), quant.dequantize(w))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_int8_quantization_error_is_bounded():
    """Per output channel, |w - dequant(q)| <= scale / 2 = max|w| / 254."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 33)), jnp.float32)
    err = jnp.abs(quant.dequantize(quant.pack(w, 1, "int8")) - w)
    assert bool(jnp.all(err <= jnp.max(jnp.abs(w), axis=0) / 254 + 1e-7))


def test_bad_input_is_refused():
    w = quant.pack(jnp.ones((8, 4)), 1, "int8")
    with pytest.raises(ValueError, match="input dims"):
        kernels.kernel(jnp.ones((2, 9)), w, 0)
    with pytest.raises(ValueError, match="K divisible by 32"):
        raw = np.zeros((4, 34), np.uint8)
        kernels.kernel(jnp.ones((1, 33)),
                       quant.QuantizedWeight(jnp.asarray(raw), jnp.zeros(0), "q8_0", (33,), (4,)),
                       0)


def test_isa_switch(monkeypatch):
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "generic")
    assert kernels.isa_level() == 0
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "avx512")
    assert kernels.isa_level() == NATIVE  # never above what the CPU runs
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "none")
    assert kernels.isa_level() == -1
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "sse9")
    with pytest.raises(ValueError, match="none, generic, avx2, avx512"):
        kernels.isa_level()


def test_missing_compiler_falls_back_to_plain_jax(monkeypatch, tmp_path, caplog):
    """No compiler: one warning, no library, and the backend's linear is the reference."""
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert build.load(tmp_path / "libmissing.so") is None
    assert "no C++ compiler" in caplog.text and "plain-JAX path" in caplog.text
    load = build.load.__wrapped__  # uncached
    monkeypatch.setattr(build, "load", lambda: load(tmp_path / "lib2.so"))
    kernels._native_isa.cache_clear()
    try:
        assert kernels.isa_level() == -1
        w = quant.pack(jnp.asarray(np.random.default_rng(2).standard_normal((16, 8))), 1, "int8")
        x = jnp.ones((1, 16), jnp.float32)
        np.testing.assert_array_equal(np.asarray(CpuBackend().linear(x, w)),
                                      np.asarray(quant.reference_linear(x, w)))
    finally:
        kernels._native_isa.cache_clear()


def test_min_token_bucket_option():
    """Batch-1 decode steps of one row (so the kernel computes one) by default; the backend
    option gives back a larger smallest bucket."""
    assert CpuBackend().capabilities.min_token_bucket == 1
    assert CpuBackend({"min_token_bucket": 16}).capabilities.min_token_bucket == 16
    assert CpuBackend.capabilities.min_token_bucket == 1  # the class default is unchanged
    with pytest.raises(ValueError, match="1, 2, 4, 8 or 16"):
        CpuBackend({"min_token_bucket": 3})
