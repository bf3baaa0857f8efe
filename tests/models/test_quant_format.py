"""The fp8 and int4 quantized-weight formats (engine.model.quant): layout, round trips, and
the stacked (lax.scan) form equal to the per-layer one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.model import quant


def test_int4_layout_is_the_documented_one():
    # One row, K = 8, two groups of 4: codes 0..7 written by hand as nibbles, low first.
    codes = np.array([[3, 12, 0, 15, 7, 8, 1, 2]], np.uint8)
    data = jnp.asarray(codes[:, 0::2] | (codes[:, 1::2] << 4))  # [1, 4]
    scales = jnp.asarray([[0.5, 2.0]], jnp.float32)
    zeros = jnp.asarray([[8.0, 1.0]], jnp.float32)
    w = quant.QuantizedWeight(data, scales, "int4", (8,), (1,), zeros)
    want = np.array([(3 - 8) * .5, (12 - 8) * .5, (0 - 8) * .5, (15 - 8) * .5,
                     (7 - 1) * 2., (8 - 1) * 2., (1 - 1) * 2., (2 - 1) * 2.], np.float32)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(w))[:, 0], want)
    assert w.group_size == 4 and quant.row_bytes("int4", 8) == 4


@pytest.mark.parametrize("fmt,bound", [("fp8", 0.07), ("int4", 0.07), ("int8", 0.005)])
def test_round_trip_error_is_bounded(fmt, bound):
    w = jax.random.normal(jax.random.PRNGKey(0), (256, 4, 8))  # logical [K] + [4, 8]
    q = quant.pack(w, 1, fmt)
    err = jnp.abs(quant.dequantize(q) - w)
    # Relative to each output channel's largest weight (int4: to its group's range).
    assert float(jnp.max(err / jnp.max(jnp.abs(w), axis=0))) < bound
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 256))
    y = quant.reference_linear(x, q)
    np.testing.assert_allclose(y, jnp.einsum("tk,kab->tab", x, quant.dequantize(q)),
                               rtol=1e-5, atol=1e-4)


def test_fp8_is_stored_as_e4m3_with_channel_scales():
    w = jnp.stack([jnp.linspace(-1, 1, 64), jnp.linspace(-900, 900, 64)], axis=1)  # [K, N=2]
    q = quant.pack(w, 1, "fp8")
    assert q.data.dtype == jnp.float8_e4m3fn and q.data.shape == (2, 64)
    np.testing.assert_allclose(q.scales, [1 / 448, 900 / 448], rtol=1e-6)
    assert float(jnp.max(jnp.abs(q.data.astype(jnp.float32)))) == 448.0


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_stacked_equals_per_layer(fmt):
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 128, 16))  # [L, K, N]
    stacked = quant.pack_stacked(w, 1, fmt, group=32)
    for layer in range(3):
        one = quant.pack(w[layer], 1, fmt, group=32)
        got = jax.tree.map(lambda a, i=layer: a[i], stacked)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_int4_group_must_divide_k():
    with pytest.raises(ValueError, match="divisible"):
        quant.pack(jnp.ones((96, 4)), 1, "int4", group=64)


def test_quantized_embedding_rows():
    e = jax.random.normal(jax.random.PRNGKey(3), (50, 64))  # [V, E]
    for fmt in ("fp8", "int4"):
        head = quant.pack(e.T, 1, fmt, group=32)  # logical [E] + [V], stored [V, E]
        rows = quant.embed_rows(head, jnp.asarray([0, 7, 49]), jnp.float32)
        np.testing.assert_allclose(rows, quant.dequantize(head).T[jnp.asarray([0, 7, 49])],
                                   rtol=1e-6)
