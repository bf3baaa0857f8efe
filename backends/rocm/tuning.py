"""The shared Triton kernels' tuning for AMD Instinct targets, as data.

Nothing here has been measured on an AMD GPU (none was available, 2026-12-03): the figures
follow the hardware's published shape and AMD's own Triton attention defaults, and each is
checked only to compile (tests/backends/rocm/test_rocm_compile.py: the kernels lowered for
ROCm and compiled by Triton for the target, with their LDS use under the target's limit).
Retune with scripts/cuda_probe.py and scripts/cuda_prefill_bench.py on the hardware.

- num_warps counts wavefronts of 64 lanes on AMD: 4 is 256 threads, like 8 warps on NVIDIA.
- num_stages 1 is Pallas's default on ROCm. AMD's stream pipeliner prefetches into LDS
  (shared memory): 64 KiB a CU on gfx942 (MI300X), 160 KiB on gfx950 (MI355X), so only
  gfx950 gets a second stage for the decode kernel's row gathers (64-token blocks: with
  128, Triton gave it 130 KiB of LDS, one program a CU).
- target_programs scales CUDA's 1024 (8 per SM of an H200's 132) by the compute units:
  304 on MI300X, 256 on MI355X.
"""

from __future__ import annotations

import dataclasses

from backends.gpu.kernels.paged_decode import DecodeSizes
from backends.gpu.kernels.ragged_prefill import BlockSizes


@dataclasses.dataclass(frozen=True)
class RocmTarget:
    arch: str
    """The LLVM target (gfx942, gfx950)."""
    lds_bytes: int
    """Local data share (shared memory) per compute unit: a program's ceiling."""
    decode: DecodeSizes
    prefill: BlockSizes


TARGETS: dict[str, RocmTarget] = {
    "gfx942": RocmTarget(
        arch="gfx942", lds_bytes=64 * 1024,
        decode=DecodeSizes(pages_per_compute_block=4, target_programs=2048, num_warps=4,
                           num_stages=1, gqa_num_stages=1),
        prefill=BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=1)),
    "gfx950": RocmTarget(
        arch="gfx950", lds_bytes=160 * 1024,
        decode=DecodeSizes(pages_per_compute_block=4, target_programs=2048, num_warps=4,
                           num_stages=1, gqa_num_stages=2),
        prefill=BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=1)),
}
"""Keyed by arch; presets name theirs (configs/rocm-mi300x.yaml: gfx942)."""

DEVICE_KINDS = {"MI300": "gfx942", "MI325": "gfx942", "MI350": "gfx950", "MI355": "gfx950"}
"""A substring of jax's device_kind -> arch, for `target: auto`."""


def target_for(name: str, device_kind: str = "") -> RocmTarget:
    """The tuning for `name` (an arch, or 'auto': from the device kind, else gfx942)."""
    if name == "auto":
        name = next((a for k, a in DEVICE_KINDS.items() if k in device_kind.upper()), "gfx942")
    if name not in TARGETS:
        raise ValueError(f"backend option target={name!r}: expected 'auto' or one of "
                         f"{', '.join(TARGETS)}")
    return TARGETS[name]
