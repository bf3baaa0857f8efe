"""A residual add and its RMSNorm in one kernel (backends/gpu/kernels/add_norm.py, Pallas
interpreter here) equal the model's plain path (engine.model.llama.add_rms_norm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.gpu.backend import TritonBackend
from backends.gpu.kernels import add_norm
from engine.model.llama import add_rms_norm, rms_norm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_the_plain_add_and_norm(dtype):
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal((3, 256)) * 4, dtype) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(256), dtype)
    h, s = add_norm.add_rms_norm(x, y, w, 1e-5, interpret=True)
    want_h, want_s = add_rms_norm(x, y, w, 1e-5)
    assert h.dtype == s.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(want_s, np.float32))
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one rounding of the output
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(want_h, np.float32),
                               rtol=tol, atol=tol)
    # the norm reads the sum, not x: a kernel normalizing x alone fails here
    assert not np.allclose(np.asarray(h, np.float32),
                           np.asarray(rms_norm(x, w, 1e-5), np.float32), atol=0.1)


def test_backend_uses_the_kernel_for_few_tokens():
    be = TritonBackend({"interpret": True})
    x = jnp.ones((4, 64), jnp.float32)
    w = jnp.ones((64,), jnp.float32)

    def kernels(t: int, backend: TritonBackend = be) -> int:
        xt = jnp.ones((t, 64), jnp.float32)
        return str(jax.make_jaxpr(backend.add_rms_norm, static_argnums=3)(xt, xt, w, 1e-5)
                   ).count("pallas_call[")

    assert kernels(4) == 1 and kernels(add_norm.MAX_TOKENS + 1) == 0
    assert kernels(4, TritonBackend({"interpret": True, "add_norm": "xla"})) == 0
    assert not add_norm.supported(4, 576)  # SmolLM2's E: the plain path
    h, s = be.add_rms_norm(x, 2 * x, w, 1e-5)
    np.testing.assert_allclose(np.asarray(s), 3.0)
    np.testing.assert_allclose(np.asarray(h), 1.0, rtol=1e-5)
