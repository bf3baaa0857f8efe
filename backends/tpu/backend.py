"""The TPU backend: Pallas ragged paged attention over a head-major paged KV cache.

On a TPU the kernel compiles through Mosaic; without one the backend is an error that says
so (ValueError), unless asked explicitly to interpret. The same kernel then runs in Pallas's
interpret mode on the CPU, which is how it is tested without a TPU: option `interpret` is
false (the default: compile for a TPU, which must be present unless `chip` names the one to
compile for ahead of time), true or 'tpu' (the TPU simulator: DMAs, semaphores, NaN-filled
scratch, bounds checks; CLI --interpret) or 'hlo' (the kernel lowered to plain XLA:
faster, less faithful).

Options (YAML `backend:` section or LLM(..., config=...)): interpret, mesh ('1x1': data x
model; only one chip is implemented), chip ('v5e', 'v6e': the block-size table row; by
default the device's kind, needed only to compile for a TPU from a host without one),
kv_pages_per_block, queries_per_block,
kv_heads_per_block (override tuned_block_sizes.py), vmem_limit_bytes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from backends.tpu.kernels.ragged_paged_attention import (
    BlockSizes,
    get_block_sizes,
    ragged_paged_attention,
)
from backends.tpu.kernels.ragged_paged_attention.kernel import Interpret, sublane_tile
from backends.tpu.kernels.ragged_paged_attention.tuned_block_sizes import chip_name
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo, device_memory

BLOCK_OPTIONS = ("kv_pages_per_block", "queries_per_block", "kv_heads_per_block")
KNOWN_OPTIONS = ("interpret", "mesh", "chip", "vmem_limit_bytes", *BLOCK_OPTIONS)
TPU_PAGE_SIZES = (16, 32, 64, 128, 256)


def resolve_interpret(value: Any) -> Interpret:
    """false | true | 'tpu' | 'hlo' -> the kernel's `interpret` argument."""
    if value is True or value == "tpu":
        return pltpu.InterpretParams()
    if value == "hlo":
        return True
    if value is False or value is None:
        return False
    raise ValueError(f"backend option interpret must be false (run on a TPU), true or 'tpu' "
                     f"(the Pallas TPU interpreter on the CPU) or 'hlo', got {value!r}")


def parse_mesh(value: Any) -> tuple[int, int]:
    """'DxM' (data x model parallel) -> (D, M); only 1x1 runs today."""
    try:
        data, model = (int(x) for x in str(value).lower().split("x"))
    except ValueError:
        raise ValueError(f"backend option mesh must look like '1x1', got {value!r}") from None
    if (data, model) != (1, 1):
        raise ValueError(f"mesh {value!r}: only a single chip ('1x1') is implemented; "
                         f"multi-chip sharding of the TPU backend is not done yet")
    return data, model


class TpuBackend(Backend):
    name = "tpu"
    hardware, jax_plugin, can_interpret = "TPU", "jax[tpu]", True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        unknown = sorted(set(self.options) - set(KNOWN_OPTIONS))
        if unknown:
            raise ValueError(f"unknown tpu backend options {unknown}; known: {KNOWN_OPTIONS}")
        self.interpret = resolve_interpret(self.options.get("interpret", False))
        self.mesh_shape = parse_mesh(self.options.get("mesh", "1x1"))
        self.block_overrides = {k: int(self.options[k]) for k in BLOCK_OPTIONS
                                if self.options.get(k) is not None}
        self.vmem_limit_bytes = self.options.get("vmem_limit_bytes")
        on_tpu = self.interpret is False
        self.capabilities = Capabilities(
            platform="tpu" if on_tpu else "cpu",
            dtypes=("bfloat16", "float32"),
            default_dtype="bfloat16",
            page_sizes=TPU_PAGE_SIZES if on_tpu else (),
            # Unrolled by default: under lax.scan the stacked KV cache rides in the loop carry
            # and XLA:TPU keeps copies of it (SmolLM2-135M on v5e, 1.5 GB of KV: 10.1 GB of
            # temporaries scanned, 0.15 GB unrolled). The kernel still reads [L, ...] caches
            # at a layer index when scan_layers is asked for.
            scan_layers=False,
            spmd_attention=False,
        )
        chip = self.options.get("chip")
        if chip is None:  # no TPU and no chip to compile for ahead of time: the error here
            chip = self.devices()[0].device_kind if on_tpu else "interpret"
        self.chip = chip_name(str(chip))

    def memory_info(self) -> MemoryInfo:
        if self.interpret is not False:  # interpret mode runs on the host
            page = os.sysconf("SC_PAGE_SIZE")
            return MemoryInfo(total_bytes=page * os.sysconf("SC_PHYS_PAGES"),
                              free_bytes=page * os.sysconf("SC_AVPHYS_PAGES"))
        return device_memory(self.model_devices())

    def kv_cache_axes(self) -> tuple[str, ...]:
        return ("pages", "kv_heads", "page", "head_dim")

    def kv_cache_shape(self, num_pages: int, page_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """Head-major pages: [pages, Hkv, page, D] (one head's page is a [page, D] slab)."""
        return (num_pages, num_kv_heads, page_size, head_dim)

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slots: jax.Array, layer: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        """Scatter K/V [T, Hkv, D] at flat slots [T] into [L?, pages, Hkv, page, D].

        An XLA scatter, in place on the donated cache; padding slots (one past the last
        page) are dropped."""
        lead = () if layer is None else (layer,)
        page = k_cache.shape[-2]
        # Advanced indices around a slice: the indexed shape is [T, Hkv, D], as k's.
        idx = (*lead, slots // page, slice(None), slots % page)
        k_cache = k_cache.at[idx].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[idx].set(v.astype(v_cache.dtype), mode="drop")
        return k_cache, v_cache

    def block_sizes(self, q: jax.Array, k_cache: jax.Array, md: AttentionMetadata) -> BlockSizes:
        t, hq, d = q.shape
        hkv, page = k_cache.shape[-3], k_cache.shape[-2]
        bs = get_block_sizes(self.chip, jnp.dtype(k_cache.dtype).name, head_dim=d,
                             page_size=page, num_kv_heads=hkv, num_q_per_kv=hq // hkv,
                             num_tokens=t, pages_per_seq=md.page_table.shape[1],
                             itemsize=jnp.dtype(k_cache.dtype).itemsize)
        return BlockSizes(**{**bs.__dict__, **self.block_overrides})

    def attention(
        self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata,
        *, scale: float, layer: jax.Array | None = None,
    ) -> jax.Array:
        if self.interpret is False and md.page_size % sublane_tile(k_cache.dtype):
            raise ValueError(f"page_size {md.page_size} must be a multiple of "
                             f"{sublane_tile(k_cache.dtype)} for {k_cache.dtype} on TPU; "
                             f"use one of {TPU_PAGE_SIZES}")
        return ragged_paged_attention(
            q, k_cache, v_cache, md, layer, scale=scale,
            block_sizes=self.block_sizes(q, k_cache, md), interpret=self.interpret,
            vmem_limit_bytes=self.vmem_limit_bytes)
