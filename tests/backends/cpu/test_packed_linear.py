"""Weights packed for VNNI (engine.model.packed: q4_0x, q4_1x, q8_0x, int8x): the packed
layout reads back as the same weights, the one kernel equals the plain-JAX oracle at every
row count, a row's result does not depend on the batch it is in (bitwise), and the CPU
backend packs a parameter tree where (and only where) its kernel reads the packed formats."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu.backend import CpuBackend
from backends.cpu.kernels import linear as kernels
from engine import envs
from engine.model import packed, quant

VNNI = 3
pytestmark = pytest.mark.skipif(kernels._native_isa() < VNNI,
                                reason="the packed kernel needs AVX-512 VNNI (level 3)")

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
FMTS = ["int8", *sorted(QTYPES)]


def weight(rng: np.random.Generator, fmt: str, n: int, k: int) -> quant.QuantizedWeight:
    if fmt == "int8":
        return quant.pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, "int8")
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QTYPES[fmt])
    return quant.from_gguf_rows(raw, fmt, (k,), (n,))


def activations(rng: np.random.Generator, m: int, k: int) -> jnp.ndarray:
    """Mixed scales (outlier columns), as in a transformer's residual stream."""
    return jnp.asarray(rng.standard_normal((m, k)) * np.exp(2 * rng.standard_normal(k)),
                       jnp.float32)


def close(got: jnp.ndarray, ref: jnp.ndarray, k: int) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4,
                               atol=1e-5 * np.sqrt(k) * float(np.abs(ref).max() + 1))


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), blocks=st.integers(1, 20), n=st.integers(1, 70),
       fmt=st.sampled_from(FMTS), seed=st.integers(0, 2**16))
def test_packed_kernel_matches_oracle(m, blocks, n, fmt, seed):
    rng = np.random.default_rng(seed)
    k = 32 * blocks
    w = weight(rng, fmt, n, k)
    p = quant.pack_tiles(w)
    assert p.fmt == packed.PACKED[fmt] and p.data.shape == packed.data_shape(p.fmt, n, k)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(p)),
                                  np.asarray(quant.dequantize(w)))
    x = activations(rng, m, k)
    ref = quant.reference_linear(x, p, int_act=True)
    close(kernels.kernel(x, p, VNNI, int_act=True), ref, k)


@pytest.mark.parametrize("fmt", FMTS)
def test_rows_do_not_depend_on_their_batch(fmt):
    """Each row computed alone, and inside batches of every size up to 40 (register tiles of
    4 rows, remainders of 1-3, 1-2 rows over 4 tiles), gives the same bits."""
    rng = np.random.default_rng(3)
    k, n = 32 * 7, 16 * 5 + 3  # tiles in groups of 4 and 1, a partial last tile
    p = quant.pack_tiles(weight(rng, fmt, n, k))
    x = activations(rng, 40, k)
    alone = np.concatenate([np.asarray(kernels.kernel(x[i:i + 1], p, VNNI, True))
                            for i in range(40)])
    for m in (2, 3, 4, 5, 6, 7, 9, 17, 40):
        start = int(rng.integers(0, 40 - m + 1))
        got = np.asarray(kernels.kernel(x[start:start + m], p, VNNI, True))
        np.testing.assert_array_equal(got, alone[start:start + m])


@pytest.mark.parametrize("fmt", FMTS)
def test_stacked_layers_and_embedding_rows(fmt):
    """A leading layer axis packs layer by layer; a packed (tied) embedding's rows are the
    unpacked one's, bit for bit."""
    rng = np.random.default_rng(5)
    k, n = 64, 37
    ws = [weight(rng, fmt, n, k) for _ in range(2)]
    stacked = quant.QuantizedWeight(jnp.stack([w.data for w in ws]),
                                    jnp.stack([w.scales for w in ws]), fmt, (k,), (n,))
    p = quant.pack_tiles(stacked)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(p)),
                                  np.asarray(quant.dequantize(stacked)))
    tokens = jnp.asarray([0, 15, 16, 36, 5])
    np.testing.assert_array_equal(
        np.asarray(quant.embed_rows(quant.pack_tiles(ws[0]), tokens, jnp.float32)),
        np.asarray(quant.embed_rows(ws[0], tokens, jnp.float32)))


def test_backend_packs_where_its_kernel_reads_packed(monkeypatch):
    rng = np.random.default_rng(9)
    params = {"embed": weight(rng, "q8_0", 40, 64), "norm": jnp.ones(64),
              "layers": [{"wo": weight(rng, "q4_1", 64, 64), "w": jnp.ones((2, 2))}]}
    x = activations(rng, 3, 64)
    ref = quant.reference_linear(x, params["layers"][0]["wo"], int_act=True)
    out = CpuBackend().prepare_weights(params)
    assert out is params and params["embed"].fmt == "q8_0x"
    wo = params["layers"][0]["wo"]
    assert wo.fmt == "q4_1x" and CpuBackend().prepare_weights(params)["layers"][0]["wo"] is wo
    close(CpuBackend().linear(x, wo), ref, 64)
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "avx512")  # below VNNI: the oracle reads it
    close(CpuBackend().linear(x, wo), ref, 64)
    assert CpuBackend().prepare_weights({"w": weight(rng, "q4_0", 8, 32)})["w"].fmt == "q4_0"
    monkeypatch.delenv(envs.ENGINE_CPU_ISA)
    floats = CpuBackend({"activations": "float"})  # the kernel's float path reads GGUF blocks
    assert floats.prepare_weights({"w": weight(rng, "q4_0", 8, 32)})["w"].fmt == "q4_0"
    with pytest.raises(ValueError, match="integer activations"):
        kernels.kernel(x, wo, VNNI, int_act=False)
    with pytest.raises(ValueError, match="packed"):
        kernels.kernel(x, quant.QuantizedWeight(wo.data[:1], wo.scales, wo.fmt, (64,), (64,)),
                       VNNI, int_act=True)
