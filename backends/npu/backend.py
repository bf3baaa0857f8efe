"""The Ascend NPU backend: the one JAX model, traced to a jaxpr and executed with torch.

There is no JAX runtime for Ascend, so this backend does not run XLA programs. JAX only
traces the step (the same function the JAX backends jit); backends/npu/executor.py runs its
jaxpr with torch ops, and attention and KV writes (npu_attention / npu_write_kv, calls.py)
map to torch_npu's fused ops (kernels.py). `--npu-device cpu` runs all of it on CPU torch
with the plain-torch reference ops.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from backends.npu import calls
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo


class NpuBackend(Backend):
    name = "npu"
    capabilities = Capabilities(platform="torch", default_dtype="bfloat16", scan_layers=False,
                                page_sizes=(), own_model_runner=True, spmd_attention=False)

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        from backends.npu.device import resolve

        self.npu_device = str(self.options.get("npu_device") or "npu")
        self.torch_device, self.ops = resolve(self.npu_device)

    def devices(self) -> list[jax.Device]:
        return jax.devices("cpu")  # JAX only traces here (shapes; nothing runs on it)

    def memory_info(self) -> MemoryInfo:
        if self.torch_device.type == "cpu":
            page = os.sysconf("SC_PAGE_SIZE")
            return MemoryInfo(total_bytes=page * os.sysconf("SC_PHYS_PAGES"),
                              free_bytes=page * os.sysconf("SC_AVPHYS_PAGES"))
        import torch

        free, total = torch.npu.mem_get_info(self.torch_device)  # type: ignore[attr-defined]
        return MemoryInfo(total_bytes=int(total), free_bytes=int(free))

    def kv_cache_shape(self, num_pages: int, page_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """[pages + 1, page, Hkv, D]: the last page takes the padding tokens' writes (the
        fused write has no drop mode); no page table names it."""
        return (num_pages + 1, page_size, num_kv_heads, head_dim)

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slots: jax.Array, layer: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        return calls.write(k_cache, v_cache, k, v, slots, layer)

    def attention(
        self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata,
        *, scale: float, layer: jax.Array | None = None,
    ) -> jax.Array:
        return calls.attention(q, k_cache, v_cache, md, scale=scale, layer=layer)

    def runner_class(self) -> type:
        from backends.npu.runner import NpuModelRunner

        return NpuModelRunner
