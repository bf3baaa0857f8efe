"""The CPU backend on the host's memory: attention and quantized linear layers through the
C++ kernels of backends/cpu/kernels; plain JAX without them (for attention: the oracle)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from backends.cpu.attention import ragged_paged_attention
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo
from engine.model.packed import UNPACKED
from engine.model.quant import QuantizedWeight, int_activations_ok, pack_tiles, reference_linear


class CpuBackend(Backend):
    name = "cpu"
    # Buckets from 1 token and 1 sequence: the attention takes any token count, and a GEMM
    # here costs by its rows (compute-bound at 16 rows on 2 AVX2 cores), so a batch-1 decode
    # step computes one row, not 16 (the default smallest token bucket) with 15 of padding.
    capabilities = Capabilities(platform="cpu", default_dtype="float32", scan_layers=False,
                                min_seq_bucket=1, min_token_bucket=1, fp8_kv=True)

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        # Option min_token_bucket (1, 2, 4, 8 or 16; default 1, see capabilities): the
        # smallest token bucket. 16 gives back the padded decode steps (fewer programs).
        small = self.options.get("min_token_bucket")
        if small is not None:
            if small not in (1, 2, 4, 8, 16):
                raise ValueError(f"cpu option min_token_bucket must be 1, 2, 4, 8 or 16, "
                                 f"got {small!r}")
            self.capabilities = dataclasses.replace(self.capabilities, min_token_bucket=small)
        # Option activations ('int8', the default, or 'float'): how int8 and GGUF weights meet
        # x in the linear kernel. int8: x quantized per block of 32 (as llama.cpp does) and
        # integer dots; float: x as it is (the weights' values exactly, a little slower).
        acts = self.options.get("activations", "int8")
        if acts not in ("int8", "float"):
            raise ValueError(f"cpu option activations must be int8 or float, got {acts!r}")
        self.int_activations = acts == "int8"
        # Option attention ('kernel', the default, or 'reference'): the C++ paged attention
        # kernel, or the plain-JAX oracle (backends/cpu/attention.py) it is tested against.
        attn = self.options.get("attention", "kernel")
        if attn not in ("kernel", "reference"):
            raise ValueError(f"cpu option attention must be kernel or reference, got {attn!r}")
        self.attention_kernel = attn == "kernel"

    def memory_info(self) -> MemoryInfo:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(total_bytes=total, free_bytes=free)

    def attention(
        self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata,
        *, scale: float, layer: jax.Array | None = None,
    ) -> jax.Array:
        """The C++ kernel (kernels/attention); the oracle with option `attention: reference`,
        without the kernel library, under a mesh (the custom call is opaque to XLA's
        partitioner), or for a cache dtype the kernel does not read (float16)."""
        from backends.cpu.kernels import attention as kernels

        isa = kernels.isa_level() if self.attention_kernel and self.mesh is None else -1
        if isa < 0 or k_cache.dtype not in kernels.CACHE_DTYPES:
            return ragged_paged_attention(q, k_cache, v_cache, md, scale=scale, layer=layer)
        return kernels.kernel(q, k_cache, v_cache, md, scale=scale, isa=isa, layer=layer)

    def add_rms_norm(self, x: jax.Array, y: jax.Array, w: jax.Array, eps: float
                     ) -> tuple[jax.Array, jax.Array]:
        """The residual add and the norm after it in one C++ call (kernels/norm) for float32
        rows, where XLA runs four or five thunks; the model's plain JAX otherwise (bf16,
        no kernel library, under a mesh)."""
        from backends.cpu.kernels import norm

        if self.mesh is None and norm.supported(x, y, w) and norm.available():
            return norm.kernel(x, y, w, eps)
        return super().add_rms_norm(x, y, w, eps)

    def prepare_weights(self, params: Any) -> Any:
        """q4_0, q4_1, q8_0 and int8 weights packed for the VNNI kernel (q4_0x, ...:
        engine.model.packed; a tied embedding too, which embed_rows reads packed) where the
        kernel runs at level 3 or above with integer activations and no mesh (sharded
        weights keep the GGUF layout). In place, one weight at a time (the model is never
        held twice); packed weights are kept as they are."""
        from backends.cpu.kernels import linear as kernels

        if self.mesh is not None or not self.int_activations or kernels.isa_level() < 3:
            return params

        def walk(node: Any) -> None:
            for key in list(node) if isinstance(node, dict) else range(len(node)):
                if str(key).startswith("expert_"):  # experts: dequantized, never the kernel
                    continue
                if isinstance(node[key], QuantizedWeight):
                    new = pack_tiles(node[key])
                    if new is not node[key]:
                        node[key] = new  # the old arrays go with their last reference
                elif isinstance(node[key], (dict, list)):
                    walk(node[key])

        walk(params)
        return params

    def linear(self, x: jax.Array, w: QuantizedWeight) -> jax.Array:
        """The C++ kernel at every step size (kernels/linear/tuning.py has the measurements),
        with integer activations for int8 and GGUF weights unless option `activations` is
        'float'. The plain-JAX reference (of the same arithmetic) without the kernel library,
        under a mesh (the kernel's custom call is opaque to XLA's partitioner), or for a
        format the kernel does not read (fp8, int4; packed weights below level 3)."""
        from backends.cpu.kernels import linear as kernels

        int_act = self.int_activations and int_activations_ok(w)
        isa = kernels.isa_level()
        if (isa < 0 or self.mesh is not None or w.fmt not in kernels.FORMATS
                or (w.fmt in UNPACKED and (isa < 3 or not int_act))):
            return reference_linear(x, w, int_act)
        return kernels.kernel(x, w, isa, int_act)
