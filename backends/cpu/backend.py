"""The CPU backend: plain-JAX attention (the oracle) on the host's memory."""

from __future__ import annotations

import os

import jax

from backends.cpu.attention import ragged_paged_attention
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(platform="cpu", default_dtype="float32", scan_layers=False)

    def memory_info(self) -> MemoryInfo:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(total_bytes=total, free_bytes=free)

    def attention(
        self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata,
        *, scale: float, layer: jax.Array | None = None,
    ) -> jax.Array:
        return ragged_paged_attention(q, k_cache, v_cache, md, scale=scale, layer=layer)
