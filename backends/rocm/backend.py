"""The ROCm backend (AMD Instinct): the shared GPU backend (backends/gpu/backend.py) with the
Triton kernels tuned per target (backends/rocm/tuning.py), and AITER per op where asked.

Pallas reaches AMD GPUs through its Triton lowering (Mosaic GPU is NVIDIA-only); XLA on
ROCm compiles the kernels for the device's gfx target with wavefronts of 64 lanes. Nothing
of this backend has run on an AMD GPU yet (docs/rocm.md says what was verified and how).

Options (YAML `backend:` section), besides the shared ones (interpret, decode_kernel,
prefill_kernel, mixed_decode, decode_impl): target ('auto', 'gfx942', 'gfx950': whose
tuning), decode_op and prefill_op ('triton', the default, or 'aiter': backends/rocm/aiter.py,
which needs `aiter` importable and its FFI handlers from aiter_library, a shared object).
"""

from __future__ import annotations

from typing import Any

import jax

from backends.gpu.backend import TritonBackend
from backends.rocm import aiter
from backends.rocm.tuning import target_for
from engine.attention import AttentionMetadata

OPS = ("triton", "aiter")


class RocmBackend(TritonBackend):
    name = "rocm"
    hardware, jax_plugin, can_interpret = "AMD GPU", "engine[rocm]", True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        target = str(self.options.get("target", "auto"))
        kind = self.devices()[0].device_kind if target == "auto" and not self.interpret else ""
        self.target = target_for(target, kind)
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
