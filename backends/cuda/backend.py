"""The CUDA backend: bf16, head-major paged KV cache, Pallas (Triton) attention kernels.

Decode-only steps take the Pallas paged-decode kernel; steps with prompt chunks (mixed
with decodes or not) take the ragged paged-attention kernel (kernels/ragged_prefill.py).
Shapes Triton cannot tile (head dim or page size not a power of two) take the plain-JAX
ragged attention, which is correct for any mixed batch but slow for long prompts.

Options (YAML `backend:` section): interpret (run the Pallas kernels in the interpreter:
tests on a host without a GPU), decode_kernel (false: plain JAX for decodes),
prefill_kernel (false: plain JAX for steps with prompt tokens).
"""

from __future__ import annotations

from typing import Any

import jax

from backends.cpu.attention import ragged_paged_attention
from backends.cuda.kernels import ragged_prefill
from backends.cuda.kernels.paged_decode import paged_decode_attention
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo, device_memory


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.interpret = bool(self.options.get("interpret", jax.default_backend() != "gpu"))
        self.decode_kernel = bool(self.options.get("decode_kernel", True))
        self.prefill_kernel = bool(self.options.get("prefill_kernel", True))
        platform = "cpu" if self.interpret else "gpu"
        self.capabilities = Capabilities(platform=platform, default_dtype="bfloat16",
                                         scan_layers=False, spmd_attention=False,
                                         min_seq_bucket=16)

    def memory_info(self) -> MemoryInfo:
        return device_memory(self.model_devices())

    def kv_cache_axes(self) -> tuple[str, ...]:
        return ("kv_heads", "pages", "page", "head_dim")

    def kv_cache_shape(self, num_pages: int, page_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_pages, page_size, head_dim)

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slots: jax.Array, layer: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        if layer is not None:
            raise ValueError("the CUDA backend runs unrolled layers (scan_layers: false)")
        page = k_cache.shape[2]
        idx = (slice(None), slots // page, slots % page)  # -> [Hkv, T, D]
        k_cache = k_cache.at[idx].set(k.swapaxes(0, 1).astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[idx].set(v.swapaxes(0, 1).astype(v_cache.dtype), mode="drop")
        return k_cache, v_cache

    def attention(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                  md: AttentionMetadata, *, scale: float, layer: jax.Array | None = None,
                  ) -> jax.Array:
        if md.decode_only and self.decode_kernel:
            return paged_decode_attention(q, k_cache, v_cache, md, scale=scale,
                                          interpret=self.interpret)
        _, _, page, d = k_cache.shape
        if (not md.decode_only and self.prefill_kernel
                and ragged_prefill.supported(d, page)):
            return ragged_prefill.ragged_paged_attention(q, k_cache, v_cache, md, scale=scale,
                                                         interpret=self.interpret)
        return ragged_paged_attention(q, k_cache, v_cache, md, scale=scale, head_major=True)
