"""The ROCm backend (AMD Instinct): the shared GPU backend (backends/gpu/backend.py) with the
Triton kernels tuned per target (backends/rocm/tuning.py), and AITER per op where asked.

Pallas reaches AMD GPUs through its Triton lowering (Mosaic GPU is NVIDIA-only); XLA on
ROCm compiles the kernels for the device's gfx target with wavefronts of 64 lanes. Nothing
of this backend has run on an AMD GPU yet (docs/rocm.md says what was verified and how).

Options (YAML `backend:` section), besides the shared ones (interpret, decode_kernel,
prefill_kernel, mixed_decode, decode_impl): target ('auto', 'gfx942', 'gfx950': whose
tuning), decode_op and prefill_op ('triton', the default, or 'aiter': backends/rocm/aiter.py,
which needs `aiter` importable and its FFI handlers from aiter_library, a shared object),
fp8_type ('auto', 'e4m3fn', 'e4m3fnuz': the FP8 type of fp8 weights, W8A8 activations and an
fp8 KV cache).

FP8 (2026-12-04): MI300 (gfx942) computes FP8 in float8_e4m3fnuz (no negative zero, no
infinity, exponent bias 8, largest 240); MI350 (gfx950) in OCP float8_e4m3fn, as NVIDIA and
the checkpoints do. 'auto' takes e4m3fnuz on a gfx94x device and e4m3fn elsewhere, and on
the CPU (interpret). With e4m3fnuz, fp8 weights (made at load or read from an fp8
checkpoint, e4m3fn) are converted once at load and on every weight update
(prepare_weights: quant.fp8_to_fnuz, exact), W8A8 activations are quantized to e4m3fnuz
(scale max|x| / 240), and --kv-cache-dtype fp8 allocates the cache in e4m3fnuz (written
clipped to +-240). All of it runs the shared kernels of backends/gpu, and all of it is
tested only on the CPU (the Pallas interpreter, and Triton's AMD compiler for gfx942): it
has never run on an AMD GPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from backends.gpu.backend import TritonBackend
from backends.rocm import aiter
from backends.rocm.tuning import DEVICE_KINDS, target_for
from engine.attention import AttentionMetadata
from engine.model.quant import QuantizedWeight, fp8_to_fnuz

OPS = ("triton", "aiter")
FP8_TYPES = {"e4m3fn": jnp.dtype(jnp.float8_e4m3fn), "e4m3fnuz": jnp.dtype(jnp.float8_e4m3fnuz)}
"""backend option fp8_type -> the e4m3 dtype ('auto': fp8_type_for)."""
FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")
"""The AMD targets whose FP8 hardware is e4m3fnuz: MI300A/X, MI325X (gfx942)."""


def device_arch(device: Any) -> str:
    """The gfx target of a jax ROCm device, '' if it does not say. Read from what jax reports
    (never run on an AMD GPU, 2026-12-04): XLA's ROCm client gives a device the attribute
    compute_capability as its gcnArchName (e.g. 'gfx942:sramecc+:xnack-'; the target before
    the first ':'); where that is missing, the device_kind (hipDeviceProp's name, 'AMD
    Instinct MI300X') mapped by tuning.DEVICE_KINDS."""
    cc = str(getattr(device, "compute_capability", "") or "").split(":")[0].strip().lower()
    if cc.startswith("gfx"):
        return cc
    kind = str(getattr(device, "device_kind", "")).upper()
    return next((arch for name, arch in DEVICE_KINDS.items() if name in kind), "")


def fp8_type_for(choice: str, arch: str) -> jnp.dtype:
    """The e4m3 dtype for backend option fp8_type `choice` on a device of gfx target `arch`
    ('' on the CPU): 'auto' is e4m3fnuz on gfx94x (MI300), e4m3fn otherwise."""
    if choice == "auto":
        choice = "e4m3fnuz" if arch in FNUZ_ARCHS else "e4m3fn"
    if choice not in FP8_TYPES:
        raise ValueError(f"backend option fp8_type={choice!r}: expected 'auto' (e4m3fnuz on "
                         f"MI300, gfx94x; e4m3fn otherwise), 'e4m3fn' or 'e4m3fnuz'")
    return FP8_TYPES[choice]


class RocmBackend(TritonBackend):
    name = "rocm"
    hardware, jax_plugin, can_interpret = "AMD GPU", "engine[rocm]", True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        target = str(self.options.get("target", "auto"))
        kind = self.devices()[0].device_kind if target == "auto" and not self.interpret else ""
        self.target = target_for(target, kind)
        self.fp8_dtype = fp8_type_for(str(self.options.get("fp8_type", "auto")),
                                      self._fp8_arch())
        self.decode_sizes = self.target.decode
        self.prefill_sizes = self.target.prefill
        self.decode_op = self._op("decode_op")
        self.prefill_op = self._op("prefill_op")
        library = self.options.get("aiter_library")
        if library and aiter.aiter_importable():
            aiter.register_handlers(str(library))
        for op, choice in (("decode", self.decode_op), ("prefill", self.prefill_op)):
            if choice == "aiter" and not aiter.available(op):
                raise ValueError(
                    f"backend option {op}_op=aiter: AITER's {op} op is not available "
                    f"(aiter importable: {aiter.aiter_importable()}, aiter_library="
                    f"{library!r}); install AITER (amd-aiter, on ROCm) and give its FFI "
                    f"handler library as aiter_library, or set {op}_op: triton")

    def _fp8_arch(self) -> str:
        """The arch fp8_type 'auto' follows: the device's; none interpreted on the CPU
        (e4m3fn); the target option's when compiling for a target on a host without the
        GPU (backends/rocm/triton_check.py)."""
        if self.interpret or self.options.get("fp8_type", "auto") != "auto":
            return ""
        try:
            return device_arch(self.devices()[0])
        except ValueError:  # no AMD GPU here (an explicit target: `auto` asked the device)
            return self.target.arch

    def prepare_weights(self, params: Any) -> Any:
        """With fp8_type e4m3fnuz, every fp8 weight as float8_e4m3fnuz (quant.fp8_to_fnuz:
        the same bytes, doubled scales; exact); other weights, and every weight with
        e4m3fn, as they are. Both copies of a weight exist until the old tree is dropped."""
        if self.fp8_dtype != jnp.float8_e4m3fnuz:
            return params

        def convert(leaf: Any) -> Any:
            if isinstance(leaf, QuantizedWeight) and leaf.fmt == "fp8":
                return fp8_to_fnuz(leaf)
            return leaf

        return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))

    def _op(self, key: str) -> str:
        choice = str(self.options.get(key, "triton"))
        if choice not in OPS:
            raise ValueError(f"backend option {key}={choice!r}: expected one of {OPS}")
        return choice

    def attention(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                  md: AttentionMetadata, *, scale: float, layer: jax.Array | None = None,
                  ) -> jax.Array:
        if md.decode_only and self.decode_op == "aiter":
            return aiter.paged_decode(q, k_cache, v_cache, md, scale=scale)
        if not md.decode_only and self.prefill_op == "aiter":
            return aiter.prompt_attention(q, k_cache, v_cache, md, scale=scale)
        return super().attention(q, k_cache, v_cache, md, scale=scale, layer=layer)
