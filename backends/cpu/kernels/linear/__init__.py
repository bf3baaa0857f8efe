"""The CPU linear layer through jax.ffi: reference, validation, kernel, public wrapper.

y [T, *out_shape] = x [T, *in_shape] @ w for an engine.model.quant.QuantizedWeight in any
of its formats (float32, bf16, int8 per-channel, GGUF q8_0/q4_0/q4_1/q4_k/q6_k, and the
VNNI-packed q4_0x/q4_1x/q8_0x/int8x of engine.model.packed), computed by
linear.cc at the ISA level chosen here, with float32 activations or (int_act, int8 and GGUF
weights) activations quantized per block of 32 and integer dots. The reference is
engine.model.quant.reference_linear (with int_act: the same activation quantization).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.kernels import build
from engine import envs
from engine.model import packed
from engine.model.quant import (
    BLOCK,
    FORMATS,
    SUPER,
    SUPER_BYTES,
    QuantizedWeight,
    int_activations_ok,
    reference_linear,
    row_bytes,
)

log = logging.getLogger(__name__)

TARGET = "engine_cpu_linear"
reference = reference_linear


@functools.cache
def _native_isa() -> int:
    """The best ISA level of this CPU the library runs (0 generic, 1 AVX2, 2 AVX-512, 3
    AVX-512 VNNI, 4 AMX: level 3 plus bf16 tiles above 4 rows, only where cpuid and the OS's
    tile permission allow it), or -1 without the library. Registers the FFI target on first
    call."""
    lib = build.register(TARGET, "EngineCpuLinear")
    return -1 if lib is None else int(lib.engine_cpu_isa())


AMX = 4
"""The AMX level runs only where ENGINE_CPU_ISA=amx asks for it: its tiles round x and the
weights to bf16 (every format, either activation mode: linear.cc's "AMX"), which the other
levels' arithmetic does not (the float32 layout is exact; integer activations are llama.cpp's
blocks). On the first AMX host here (a 2-core Xeon, 2026-12-04) it passed scripts/amx_check.py
and, taken by default, failed 23 tests that compare with those references. Speed there
(amx_check, idle host, best of 10, SmolLM2's shapes): float32 weights at 256 rows 0.92
against 2.47 ms (level 3's float path), at 32 rows 0.60-0.96 against 0.66-0.79; int8, Q4_1
and Q8_0 at 256 rows 0.81-0.89 against level 3's integer tiles' 0.91-1.05, at 32 rows
1.3-3x slower than them."""


def isa_level() -> int:
    """The ISA level the kernels run at: the CPU's best up to level 3 (AMX, 4, only when
    ENGINE_CPU_ISA=amx asks), capped by ENGINE_CPU_ISA; -1 means no kernel (no library, or
    ENGINE_CPU_ISA=none)."""
    native, cap = _native_isa(), envs.cpu_isa_cap()
    return min(native, AMX - 1 if cap is None else cap)


def _check(x: jax.Array, w: QuantizedWeight) -> None:
    if w.fmt not in FORMATS:
        raise ValueError(f"unknown weight format {w.fmt!r}; known: {', '.join(FORMATS)}")
    if x.ndim < 1 or x.shape[1:] != w.in_shape:
        raise ValueError(f"x {x.shape} does not match the weight's input dims {w.in_shape}")
    if w.fmt not in ("f32", "bf16", "int8") and w.k % BLOCK:
        raise ValueError(f"{w.fmt} needs K divisible by {BLOCK}, got K={w.k}")
    if w.fmt in SUPER_BYTES and w.k % SUPER:
        raise ValueError(f"{w.fmt} needs K divisible by {SUPER}, got K={w.k}")
    if w.fmt in packed.UNPACKED:
        if w.k % BLOCK or w.data.shape != packed.data_shape(w.fmt, w.n, w.k):
            raise ValueError(f"{w.fmt} data {w.data.shape} does not fit a packed weight of "
                             f"N={w.n}, K={w.k}")
        return
    if w.data.shape != (w.n, row_bytes(w.fmt, w.k)) and w.fmt not in ("f32", "bf16", "int8"):
        raise ValueError(f"{w.fmt} data {w.data.shape} is not [N={w.n}, row bytes]")
    if w.fmt in ("f32", "bf16", "int8") and w.data.shape != (w.n, w.k):
        raise ValueError(f"{w.fmt} data {w.data.shape} is not [N={w.n}, K={w.k}]")


def kernel(x: jax.Array, w: QuantizedWeight, isa: int, int_act: bool = False) -> jax.Array:
    """The FFI call: x [T, *in_shape] -> [T, *out_shape] (x's dtype, float32 inside).
    int_act: integer activations (int8 and GGUF formats, K a multiple of 32)."""
    _check(x, w)
    if w.fmt in packed.UNPACKED and (not int_act or isa < 3):
        raise ValueError(f"{w.fmt} (packed for VNNI) needs integer activations and ISA level "
                         f">= 3, got int_act={int_act}, isa={isa}")
    if int_act and not int_activations_ok(w):
        raise ValueError(f"integer activations need an int8 or GGUF weight with K divisible "
                         f"by {BLOCK}; got {w.fmt} with K={w.k}")
    t = x.shape[0]
    x2 = x.reshape(t, w.k).astype(jnp.float32)  # [T, K]
    scales = w.scales if w.fmt in ("int8", "int8x") else jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((t, w.n), jnp.float32))
    y = call(x2, w.data, scales, fmt=np.int32(FORMATS[w.fmt]), isa=np.int32(isa),
             act=np.int32(int_act))  # [T, N]
    return y.reshape(t, *w.out_shape).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("isa", "int_act"))
def linear(x: jax.Array, w: QuantizedWeight, isa: int | None = None, int_act: bool = False
           ) -> jax.Array:
    """x [T, *in_shape] @ w -> [T, *out_shape]: the kernel at `isa` (default isa_level()),
    or the plain-JAX reference where there is no kernel."""
    isa = isa_level() if isa is None else isa
    return reference(x, w, int_act) if isa < 0 else kernel(x, w, isa, int_act)
