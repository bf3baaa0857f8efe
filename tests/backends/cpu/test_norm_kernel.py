"""The CPU add + RMSNorm kernel equals the model's plain JAX (engine.model.llama.add_rms_norm),
the CPU backend takes it for float32 rows (one custom call in the step's program) and the
plain JAX for the rest, and bad operands are refused with the shapes in the message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu.backend import CpuBackend
from backends.cpu.kernels import norm

pytestmark = pytest.mark.skipif(not norm.available(), reason="the CPU kernel library is not "
                                "built here")


def check(x: np.ndarray, y: np.ndarray, w: np.ndarray, eps: float) -> None:
    h, s = norm.kernel(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), eps)
    rh, rs = norm.reference(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), eps)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))  # one float add each
    # The sum of squares in another order: relative error about sqrt(E) float32 epsilons.
    np.testing.assert_allclose(np.asarray(h), np.asarray(rh), rtol=1e-5,
                               atol=1e-6 * float(np.abs(np.asarray(rh)).max() + 1))


@settings(max_examples=15, deadline=None)
@given(t=st.sampled_from([1, 32]), e=st.sampled_from([17, 576]),  # E: a 16-lane tail, SmolLM2
       scale=st.sampled_from([1e-3, 1.0, 1e3]), eps=st.sampled_from([1e-5, 0.1]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(t, e, scale, eps, seed):
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((2, t, e)) * scale).astype(np.float32)
    check(x, y, rng.standard_normal(e).astype(np.float32), eps)


def test_a_zero_sum_row_stays_zero():
    """x + y == 0 on a row: the norm divides by sqrt(eps), giving zeros, not NaN."""
    x = np.arange(1, 577, dtype=np.float32).reshape(1, 576)
    x = np.concatenate([x, -x[::-1]])  # [2, 576]
    y = np.concatenate([-x[:1], np.ones((1, 576), np.float32)])
    check(x, y, np.full(576, 2.0, np.float32), 1e-5)
    h, _ = norm.kernel(jnp.asarray(x), jnp.asarray(y), jnp.ones(576, jnp.float32), 1e-5)
    assert not np.asarray(h[0]).any() and np.isfinite(np.asarray(h)).all()


def _targets(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_backend_takes_the_kernel_for_float32_only():
    be = CpuBackend()
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((3, 64)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(64), jnp.float32)

    def f(x, y, w):
        return be.add_rms_norm(x, y, w, 1e-5)

    assert norm.TARGET in _targets(f, x, y, w)
    h, s = jax.jit(f)(x, y, w)
    rh, rs = norm.reference(x, y, w, 1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(rh), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    xb, yb, wb = (a.astype(jnp.bfloat16) for a in (x, y, w))
    assert norm.TARGET not in _targets(f, xb, yb, wb)  # bf16: the model's plain JAX
    hb, sb = jax.jit(f)(xb, yb, wb)
    assert hb.dtype == sb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(hb, np.float32),  # bf16 rounding, fused or not
                               np.asarray(norm.reference(xb, yb, wb, 1e-5)[0], np.float32),
                               rtol=2e-2, atol=2e-2)


def test_bad_operands_are_refused():
    x = jnp.zeros((2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"x float32\[2, 8\], y float32\[2, 4\]"):
        norm.kernel(x, jnp.zeros((2, 4), jnp.float32), jnp.zeros(8, jnp.float32), 1e-5)
    with pytest.raises(ValueError, match=r"w float32\[4\]"):
        norm.kernel(x, x, jnp.zeros(4, jnp.float32), 1e-5)
    with pytest.raises(ValueError, match="needs float32"):
        norm.kernel(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16), jnp.zeros(8), 1e-5)
