"""The CPU residual add + RMSNorm through jax.ffi: reference, validation, kernel, wrapper.

(h, s) = (rms_norm(x + y) * w, x + y) for x, y float32 [T, E] and w [E], computed by norm.cc
in one custom call where XLA makes four or five thunks (a batch-1 decode step runs two per
layer). The reference is engine.model.llama.add_rms_norm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.kernels import build
from engine.model.llama import add_rms_norm

TARGET = "engine_cpu_add_rms_norm"
reference = add_rms_norm


@functools.cache
def available() -> bool:
    """Whether the kernel library loaded (registers the FFI target on first call)."""
    return build.register(TARGET, "EngineCpuAddRmsNorm") is not None


def supported(x: jax.Array, y: jax.Array, w: jax.Array) -> bool:
    """The kernel's case: float32 [T, E] operands and a float32 [E] weight."""
    return (x.ndim == 2 and x.shape == y.shape and w.shape == x.shape[1:]
            and x.dtype == y.dtype == w.dtype == jnp.float32)


def _check(x: jax.Array, y: jax.Array, w: jax.Array) -> None:
    if not supported(x, y, w):
        raise ValueError(f"add_rms_norm kernel: needs float32 x, y [T, E] and w [E]; got "
                         f"x {x.dtype}{list(x.shape)}, y {y.dtype}{list(y.shape)}, "
                         f"w {w.dtype}{list(w.shape)}")


def kernel(x: jax.Array, y: jax.Array, w: jax.Array, eps: float
           ) -> tuple[jax.Array, jax.Array]:
    """The FFI call: x, y [T, E], w [E] -> (h [T, E], s [T, E]); the library must be loaded
    (available())."""
    _check(x, y, w)
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    h, s = jax.ffi.ffi_call(TARGET, (out, out))(x, y, w, eps=np.float32(eps))
    return h, s

