"""The CPU linear kernel equals the plain-JAX reference (engine.model.quant) for every weight
format, with float and with integer activations, at every ISA level this CPU runs (lower
levels forced, as ENGINE_CPU_ISA does), and the GGUF reference equals the gguf package's own
dequantization (K-quants on random blocks)."""

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
AMX = kernels.AMX  # bf16 tiles, only when asked (test_amx_level_is_the_product_of_bf16_operands)
LEVELS = list(range(min(NATIVE, AMX - 1) + 1))
pytestmark = pytest.mark.skipif(NATIVE < 0, reason="the CPU kernel library is not built here")

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
KQTYPES = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}


def random_k_blocks(rng: np.random.Generator, fmt: str, n: int, supers: int) -> np.ndarray:
    """Random K-quant rows uint8 [N, supers * bytes]: random bits, small finite f16 scales."""
    size = quant.SUPER_BYTES[fmt]
    raw = rng.integers(0, 256, (n, supers, size), dtype=np.uint8)
    halves = (rng.standard_normal((n, supers, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if fmt == "q4_k":
        raw[..., 0:4] = halves.reshape(n, supers, 4)  # d, dmin
    else:
        raw[..., 208:210] = halves.reshape(n, supers, 4)[..., :2]  # d
    return raw.reshape(n, supers * size)


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


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 24), blocks=st.integers(1, 20), n=st.integers(1, 40),
       fmt=st.sampled_from(["int8", *sorted(QTYPES)]), seed=st.integers(0, 2**16))
def test_integer_activations_match_emulation(m, blocks, n, fmt, seed):
    """x quantized per block of 32 and integer dots (direct from the blocks up to 4 rows,
    decoded tiles above): the plain-JAX emulation of that arithmetic, to float rounding.
    Activations of mixed scales (outlier columns), as in a transformer's residual stream."""
    rng = np.random.default_rng(seed)
    k = 32 * blocks
    if fmt == "int8":
        w = quant.pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, "int8")
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QTYPES[fmt])
        w = quant.from_gguf_rows(raw, fmt, (k,), (n,))
    x = rng.standard_normal((m, k)) * np.exp(2 * rng.standard_normal(k))  # [M, K]
    x = jnp.asarray(x, jnp.float32)
    ref = quant.reference_linear(x, w, int_act=True)
    assert float(jnp.abs(ref - quant.reference_linear(x, w)).max()) > 0  # x was quantized
    for isa in LEVELS:
        close(kernels.kernel(x, w, isa, int_act=True), ref, k)


@settings(max_examples=4, deadline=None)
@given(m=st.integers(1, 12), supers=st.integers(1, 3), n=st.integers(1, 12),
       fmt=st.sampled_from(sorted(KQTYPES)), seed=st.integers(0, 2**16))
def test_k_quants_match_reference_and_gguf(m, supers, n, fmt, seed):
    rng = np.random.default_rng(seed)
    k = 256 * supers
    raw = random_k_blocks(rng, fmt, n, supers)
    w = quant.from_gguf_rows(raw, fmt, (k,), (n,))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(w)),
                                  gguf.quants.dequantize(raw, KQTYPES[fmt]).T)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    for int_act in (False, True):
        ref = quant.reference_linear(x, w, int_act=int_act)
        for isa in LEVELS:
            close(kernels.kernel(x, w, isa, int_act=int_act), ref, k)


def test_activation_quantization_error_is_bounded():
    """Per block of 32: |x - x'| <= step / 2 with step = max|x| / 127; zero blocks stay 0."""
    x = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    x[1, 32:64] = 0
    got = np.asarray(quant.quantize_activations(jnp.asarray(x)))
    step = np.abs(x.reshape(5, 3, 32)).max(-1, keepdims=True) / 127
    assert (np.abs(got - x).reshape(5, 3, 32) <= step / 2 * (1 + 1e-6)).all()
    assert (got[1, 32:64] == 0).all()
    q = got.reshape(5, 3, 32) / np.where(step > 0, step, 1)
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # on the grid of the step


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
    with pytest.raises(ValueError, match="integer activations need"):
        kernels.kernel(jnp.ones((1, 64)), quant.pack(jnp.ones((64, 4)), 1, "f32"), 0, True)
    with pytest.raises(ValueError, match="K divisible by 256"):
        raw = np.zeros((4, 18 * 144 // 256 * 8), np.uint8)
        kernels.kernel(jnp.ones((1, 288)),
                       quant.QuantizedWeight(jnp.asarray(raw), jnp.zeros(0), "q4_k", (288,),
                                             (4,)), 0)


def test_isa_switch(monkeypatch):
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "generic")
    assert kernels.isa_level() == 0
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "avx512")
    assert kernels.isa_level() == min(NATIVE, 2)  # never above what the CPU runs
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "avx512vnni")
    assert kernels.isa_level() == min(NATIVE, 3)
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "amx")
    assert kernels.isa_level() == NATIVE
    monkeypatch.delenv(envs.ENGINE_CPU_ISA)
    assert kernels.isa_level() == min(NATIVE, 3)  # AMX only when asked for
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "none")
    assert kernels.isa_level() == -1
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "sse9")
    with pytest.raises(ValueError, match="none, generic, avx2, avx512, avx512vnni"):
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
        w32 = quant.pack(jnp.asarray(np.random.default_rng(2).standard_normal((32, 8))), 1,
                         "int8")  # K = 32: integer activations by default
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32)), jnp.float32)
        np.testing.assert_array_equal(np.asarray(CpuBackend().linear(x, w32)),
                                      np.asarray(quant.reference_linear(x, w32, True)))
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


def test_activations_option():
    """Backend option activations: int8 (default) quantizes x for int8/GGUF weights; float
    gives the weights' exact values; f32 weights never quantize x."""
    rng = np.random.default_rng(4)
    w = quant.pack(jnp.asarray(rng.standard_normal((64, 8)), jnp.float32), 1, "int8")
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    ints, floats = CpuBackend().linear(x, w), CpuBackend({"activations": "float"}).linear(x, w)
    close(ints, quant.reference_linear(x, w, True), 64)
    close(floats, quant.reference_linear(x, w), 64)
    assert float(jnp.abs(ints - floats).max()) > 0
    w32 = quant.pack(jnp.asarray(rng.standard_normal((64, 8)), jnp.float32), 1, "f32")
    close(CpuBackend().linear(x, w32), quant.reference_linear(x, w32), 64)
    with pytest.raises(ValueError, match="int8 or float"):
        CpuBackend({"activations": "int4"})


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4_0", "q4_1"])
def test_integer_paths_match_emulation_at_edge_shapes(fmt):
    """Above 4 rows, VNNI runs register tiles of 4 x rows by 32 columns (one column per
    lane): row counts that leave 1-3 rows over and column counts that leave a partial tile.
    Up to 4 rows (integer dots straight from the blocks): 1 and 3 rows.
    At every level, against the plain-JAX emulation of the integer arithmetic."""
    rng = np.random.default_rng(7)
    for m, blocks, n in ((7, 3, 64), (9, 18, 40), (1, 18, 9), (3, 5, 5)):
        k = 32 * blocks
        if fmt == "int8":
            w = quant.pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, "int8")
        else:
            raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32),
                                       QTYPES[fmt])
            w = quant.from_gguf_rows(raw, fmt, (k,), (n,))
        x = rng.standard_normal((m, k)) * np.exp(2 * rng.standard_normal(k))  # [M, K]
        x = jnp.asarray(x, jnp.float32)
        ref = quant.reference_linear(x, w, int_act=True)
        for isa in LEVELS:
            close(kernels.kernel(x, w, isa, int_act=True), ref, k)


def bf16(a) -> np.ndarray:
    """Values rounded to bf16 (ml_dtypes' cast: nearest, ties to even), as float64."""
    return np.asarray(a, jnp.bfloat16).astype(np.float64)


@pytest.mark.skipif(NATIVE < AMX, reason="no AMX here (level 4 needs AMX-TILE/BF16)")
@pytest.mark.parametrize("fmt", ["f32", "int8", "q4_1"])
@pytest.mark.parametrize("int_act", [False, True])
def test_amx_level_is_the_product_of_bf16_operands(fmt, int_act):
    """Level 4 (asked for) rounds x and the decoded weights to bf16 and sums in float32, in
    either activation mode: the float64 product of the bf16-rounded operands up to float32
    sums, far tighter than level 3's differences from it (float32 operands, or int8 blocks)."""
    if int_act and fmt == "f32":
        pytest.skip("integer activations are for int8 and GGUF weights")
    rng = np.random.default_rng(11)
    for m, k, n in ((5, 64, 7), (33, 576, 65)):
        w32 = rng.standard_normal((k, n)).astype(np.float32)  # [K, N]
        if fmt == "q4_1":
            raw = gguf.quants.quantize(np.ascontiguousarray(w32.T), QTYPES[fmt])
            w = quant.from_gguf_rows(raw, fmt, (k,), (n,))
        else:
            w = quant.pack(jnp.asarray(w32), 1, fmt)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        xb, wb = bf16(np.asarray(x)), bf16(np.asarray(quant.dequantize(w)))  # [M, K], [K, N]
        bound = 2.0**-16 * (np.abs(xb) @ np.abs(wb)) + 1e-6
        got = np.asarray(kernels.kernel(x, w, AMX, int_act=int_act), np.float64)
        assert (np.abs(got - xb @ wb) <= bound).all()
        level3 = np.asarray(kernels.kernel(x, w, AMX - 1, int_act=int_act), np.float64)
        assert (np.abs(level3 - xb @ wb) > bound).any()
