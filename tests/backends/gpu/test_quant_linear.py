"""The GPU's quantized linear kernels (backends/gpu/kernels/quant_linear.py) against the plain-JAX
references of engine.model.quant: reference_linear (dequantize, then a float32 dot) for int8
and int4 weight-only, w8a8_reference (activations quantized per token the same way) for
fp8. Under the Pallas interpreter on a host without a GPU; compiled by Triton on one (the
GPU script runs this file there). Shapes include sizes that are not multiples of the tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cuda.backend import CudaBackend
from backends.gpu.kernels import quant_linear as ql
from engine.model.quant import (
    FP8_MAX,
    fp8_rows,
    pack,
    reference_linear,
    w8a8_reference,
)

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Exact products and float32 sums on both sides here; on the GPU, Triton's sums run in a
# different order and x is bf16 in both (the weight-only kernels round x to bf16).
REL_TOL = 2e-3 if ON_GPU else 1e-5
FP8_WOQ_MAX_M = ql.quant_tuning.FP8_WEIGHT_ONLY_MAX_M


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bf16_values(rng, shape) -> jax.Array:
    """float32 values that bf16 holds exactly (the weight-only kernels' dot input)."""
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("m,k,n", [(3, 200, 70), (70, 256, 130)])
def test_w8a8_pallas_matches_reference(m, k, n):
    """Decode-sized (16-row tiles, K split) and prompt-sized (128-row tiles) launches."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, "fp8")
    xq, sx = fp8_rows(x)
    got = ql.w8a8_pallas(xq, sx, w.data, w.scales, out_dtype=jnp.float32, interpret=INTERPRET)
    assert got.shape == (m, n)
    assert rel_err(got, w8a8_reference(x, w)) < REL_TOL


def test_w8a8_pallas_grouped_scales_match_reference():
    """Block-scaled fp8 (HF `fp8` checkpoints: scales [N, K/G]): one scale per K step."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    w = pack(jnp.asarray(rng.standard_normal((128, 48)), jnp.float32), 1, "fp8")
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (48, 4)), jnp.float32)  # [N, K/32]
    w = type(w)(w.data, scales, "fp8", w.in_shape, w.out_shape)
    assert w.grouped and w.group_size == 32
    got = CudaBackend({"interpret": INTERPRET}).linear(x, w)
    assert rel_err(got, w8a8_reference(x, w)) < REL_TOL


def test_sharded_weights_take_plain_xla():
    """Under a mesh the backend's linear is plain XLA (a pallas_call is not partitioned):
    the same values, at bf16's precision for the weight-only formats."""
    rng = np.random.default_rng(8)
    x = bf16_values(rng, (4, 64))
    for fmt in ("int4", "int8", "fp8"):
        w = pack(jnp.asarray(rng.standard_normal((64, 40)), jnp.float32), 1, fmt, group=32)
        hlo = jax.jit(lambda x, w: ql.quant_linear(x, w, sharded=True)).lower(x, w).as_text()
        assert "pallas" not in hlo.lower() and "triton" not in hlo.lower(), fmt
        ref = w8a8_reference if fmt == "fp8" else reference_linear
        got = ql.quant_linear(x, w, sharded=True)
        assert rel_err(got, ref(x, w)) < (REL_TOL if fmt == "fp8" else 1e-2), fmt


def test_w8a8_xla_matches_reference():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 96)), jnp.float32)
    w = pack(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), 1, "fp8")
    xq, sx = fp8_rows(x)
    got = ql.w8a8_xla(xq, sx, w.data, w.scales, out_dtype=jnp.float32)
    assert rel_err(got, w8a8_reference(x, w)) < REL_TOL


GEMV = ql.GemmSizes(1, 32, 256, gemv=True, splits=2)


@pytest.mark.parametrize("fmt,m,k,n,group,sizes", [
    ("int4", 3, 256, 70, 32, GEMV),    # GEMV over 3 rows (a program each), N off the tile
    ("int4", 17, 256, 100, 64, None),  # tensor-core tiles: a 32-row tile, 4 groups of 64
    ("int8", 70, 200, 70, 0, None),    # M, K and N off the 64 x 64 x 128 tiles; two M tiles
    ("int8", 1, 200, 70, 0, None),     # GEMV, K off its 256-wide step
    ("fp8", 1, 200, 70, 0, None),      # fp8 weight-only: GEMV, K off its 256-wide step
    ("fp8", 5, 256, 130, 0, ql.GemmSizes(16, 64, 128, splits=2)),  # tiles, two K splits
])
def test_weight_only_kernel_matches_reference(fmt, m, k, n, group, sizes):
    """int4 with zero points moved off the integers: the kernel applies them as z * sum(x)
    per group, exact for any zero (a checkpoint's need not be whole codes)."""
    rng = np.random.default_rng(k + n + m)
    x = bf16_values(rng, (m, k))
    w = pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, fmt, group=group or 128)
    if fmt == "int4":
        w = type(w)(w.data, w.scales, w.fmt, w.in_shape, w.out_shape, w.zeros + 0.37)
    got = ql.woq_pallas(x, w, sizes=sizes, interpret=INTERPRET)
    assert got.shape == (m, n)
    assert rel_err(got, reference_linear(x, w)) < REL_TOL


def test_codes_are_exact_by_the_exponent_tricks():
    """Every byte: the bf16 the kernel makes of its low and high nibble is 128 + the code;
    every int8 becomes itself, in f32 (GEMV) and bf16 (tensor cores)."""
    b = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16)
    lo, hi = ql._int4_codes(b)
    assert lo.dtype == hi.dtype == jnp.bfloat16
    v = np.arange(256).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(lo, np.float32), 128 + (v & 15))
    np.testing.assert_array_equal(np.asarray(hi, np.float32), 128 + (v >> 4))
    i8 = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    for gemv, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
        got = ql._weight_values(i8, "int8", gemv)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(i8, np.float32))


@pytest.mark.parametrize("t,kernel", [(FP8_WOQ_MAX_M, "woq_fp8"), (FP8_WOQ_MAX_M + 1, "w8a8")])
def test_fp8_auto_takes_weight_only_at_small_m(t, kernel):
    """fp8_gemm 'auto': up to FP8_WEIGHT_ONLY_MAX_M rows bf16 activations and no activation
    quantization (the weight-only reference, not W8A8's), our W8A8 kernel above."""
    rng = np.random.default_rng(t)
    w = pack(jnp.asarray(rng.standard_normal((64, 40)), jnp.float32), 1, "fp8")
    x = bf16_values(rng, (t, 64))
    f = jax.jit(lambda x, w: ql.quant_linear(x, w, interpret=INTERPRET))
    names = {n for n in ("woq_fp8", "w8a8") if n in str(jax.make_jaxpr(f)(x, w))}
    assert names == {kernel}
    want = reference_linear(x, w) if kernel == "woq_fp8" else w8a8_reference(x, w)
    assert rel_err(f(x, w), want) < REL_TOL


def test_tuned_entry_sets_the_launch(monkeypatch):
    """A TUNED entry of the row bucket and shape is what runs (its tiles name the kernel);
    other shapes keep the prior."""
    key = ("int8", 8, 96, 40)  # rows 2..8 take the m=8 entry
    monkeypatch.setitem(ql.quant_tuning.TUNED, key, (16, 32, 32, 3, 4, 2, 0))
    assert ql.sizes_for("int8", 5, 96, 40) == ql.GemmSizes(16, 32, 32, 4, 2, splits=3)
    assert ql.sizes_for("int8", 9, 96, 40) == ql.prior_sizes("int8", 9)
    assert ql.sizes_for("int8", 5, 96, 48) == ql.prior_sizes("int8", 5)
    rng = np.random.default_rng(9)
    w = pack(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), 1, "int8")
    x = bf16_values(rng, (5, 96))
    f = jax.jit(lambda x, w: ql.woq_pallas(x, w, interpret=INTERPRET))
    assert "woq_int8_bm16_bn32_bk32_ks3" in str(jax.make_jaxpr(f)(x, w))
    assert rel_err(f(x, w), reference_linear(x, w)) < REL_TOL


@pytest.mark.parametrize("fmt,n_in,t", [("int4", 2, 1), ("int8", 1, ql.WOQ_MAX_M["int8"] + 8),
                                        ("int4", 2, ql.WOQ_MAX_M["int4"] + 1), ("fp8", 2, 4)])
def test_backend_linear_on_projection_shapes(fmt, n_in, t):
    """TritonBackend.linear on the model's logical shapes (wo: [Hq, D] in; fused qkv: [Hkv,
    G+2, D] out): the kernels for decode-sized steps (int4 at one row: the prior's GEMV,
    K split; fp8 W8A8 at 4 rows), the dequantized dot past the format's WOQ_MAX_M."""
    rng = np.random.default_rng(4)
    shape = (2, 32, 48) if n_in == 2 else (48, 2, 3, 32)  # wo [Hq, D] + [E]; wqkv [E] + [...]
    w = pack(jnp.asarray(rng.standard_normal(shape), jnp.float32), n_in, fmt, group=32)
    x = bf16_values(rng, (t, *w.in_shape))
    be = CudaBackend({"interpret": INTERPRET})
    got = be.linear(x, w)
    assert got.shape == (t, *w.out_shape)
    if fmt != "fp8":  # the fused kernel up to WOQ_MAX_M rows, the dequantized dot above
        assert ("woq_" in str(jax.make_jaxpr(be.linear)(x, w))) == (t <= ql.WOQ_MAX_M[fmt])
    # fp8 at 4 rows: W8A8 past FP8_WEIGHT_ONLY_MAX_M (test_fp8_auto_takes_weight_only_at_small_m).
    ref = w8a8_reference if fmt == "fp8" and t > FP8_WOQ_MAX_M else reference_linear
    # Past WOQ_MAX_M the weight-only formats run XLA's dot on the weight rounded to bf16.
    tol = 1e-2 if t > ql.WOQ_MAX_M[fmt] else REL_TOL
    assert rel_err(got, ref(x, w)) < tol


def test_fp8_rows_round_trip():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 64)) * np.array([1, 1e-3, 1e3, 5, 0, 1])[:, None],
                    jnp.float32)
    q, s = fp8_rows(x)
    back = q.astype(jnp.float32) * s[:, None]
    assert q.dtype == jnp.float8_e4m3fn and not np.isnan(np.asarray(back)).any()
    # Each row's largest magnitude maps to 448; e4m3 rounds to 3 mantissa bits (relative
    # error <= 2^-4), and below its normal range to steps of 2^-9 (times the row's scale).
    np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=1)[[0, 1, 2, 3, 5]],
                               FP8_MAX)
    err = np.abs(np.asarray(back) - np.asarray(x))
    assert (err <= 2**-4 * np.abs(np.asarray(x)) + 2**-10 * np.asarray(s)[:, None]).all()
    np.testing.assert_array_equal(np.asarray(back)[4], 0)
