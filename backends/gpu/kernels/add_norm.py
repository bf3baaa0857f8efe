"""A residual add and the RMSNorm after it in one Pallas (Triton) kernel, for steps of few
tokens (decode).

XLA makes the add and the norm two kernels, because the sum has two consumers (the norm,
and the next residual add): on an H200 at batch 1 that was 62 adds (0.120 ms) and 63 norms
(0.113 ms) of a 4.8 ms decode step (the 2026-12-01 profile in docs/benchmarks.md). Here one
program per token row reads x and y once and writes both the sum and the normed row.

Layouts: x, y [T, E] (E a power of two: a row is one Triton tile), w [E]. The sum is
rounded to x's dtype before the norm reads it, as in the model's plain path
(engine.model.llama.add_rms_norm, the reference); the norm runs in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from engine.model.llama import add_rms_norm as reference

MAX_TOKENS = 64
"""Steps of up to this many tokens take the kernel (one program per row); larger ones keep
XLA's two kernels, whose cost is then the same bytes spread over many more blocks."""

__all__ = ["MAX_TOKENS", "add_rms_norm", "reference", "supported"]


def supported(t: int, e: int) -> bool:
    return 0 < t <= MAX_TOKENS and e & (e - 1) == 0 and e >= 16


def _kernel(x_ref, y_ref, w_ref, h_ref, s_ref, *, eps: float):
    # x_ref, y_ref, h_ref, s_ref: this row [E]; w_ref [E]
    s = (x_ref[...] + y_ref[...]).astype(s_ref.dtype)
    s_ref[...] = s
    sf = s.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(sf * sf) + eps)
    h_ref[...] = (sf * r * w_ref[...].astype(jnp.float32)).astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, y: jax.Array, w: jax.Array, eps: float, *,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x, y [T, E], w [E] -> (rms_norm(x + y) * w, x + y), both in x's dtype."""
    t, e = x.shape
    if y.shape != x.shape or w.shape != (e,):
        raise ValueError(f"x {x.shape}, y {y.shape}, w {w.shape}: expected [T, E], [T, E], [E]")
    if e & (e - 1):
        raise ValueError(f"E={e} is not a power of two (add_norm.supported); use the reference")
    row = pl.BlockSpec((None, e), lambda i: (i, 0))
    h, s = pl.pallas_call(
        functools.partial(_kernel, eps=float(eps)),
        grid=(t,),
        in_specs=[row, row, pl.BlockSpec((e,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t, e), x.dtype)] * 2,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4 if e <= 4096 else 8, num_stages=1),
        name="add_rms_norm",
    )(x, y.astype(x.dtype), w)
    return h, s
