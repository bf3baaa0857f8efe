"""Every environment variable the engine reads, with a typed accessor each.

Keep this list short: settings belong in the config dataclasses; an environment variable is
only for things that must be set outside any config (where caches live).
"""

from __future__ import annotations

import os
from pathlib import Path

ENGINE_CACHE_DIR = "ENGINE_CACHE_DIR"
"""Folder for downloaded models and derived files (tokenizers built from GGUF)."""


def cache_dir() -> Path:
    """The engine's cache folder: $ENGINE_CACHE_DIR, else ~/.cache/engine. Not created here."""
    value = os.environ.get(ENGINE_CACHE_DIR, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "engine"


XLA_MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
"""JAX's share of GPU memory (its own variable). JAX's default, 0.75, would leave a quarter
of the card unused by the KV pool, so the engine defaults it to GPU_MEM_FRACTION."""
GPU_MEM_FRACTION = "0.94"


def default_gpu_memory_fraction() -> None:
    """Set XLA_PYTHON_CLIENT_MEM_FRACTION unless the user has; before JAX starts a GPU."""
    os.environ.setdefault(XLA_MEM_FRACTION, GPU_MEM_FRACTION)


ENGINE_CPU_ISA = "ENGINE_CPU_ISA"
"""Cap on the CPU kernels' instruction set: 'amx' (AVX-512 VNNI plus AMX bf16 tiles for steps
above 4 rows, x and the weights rounded to bf16; Sapphire Rapids and newer; the one level
taken only when asked for), 'avx512vnni' (AVX-512 with VNNI integer dots), 'avx512',
'avx2', 'generic' (portable C++) or 'none' (no kernels: the plain-JAX path). Unset: the best
this CPU runs up to avx512vnni. A level above what the CPU has is lowered to it."""
CPU_ISA_LEVELS = ("generic", "avx2", "avx512", "avx512vnni", "amx")


def cpu_isa_cap() -> int | None:
    """The highest CPU kernel ISA level allowed (index into CPU_ISA_LEVELS), -1 for 'none',
    None when unset. An unknown value raises with the accepted ones."""
    value = os.environ.get(ENGINE_CPU_ISA, "").strip().lower()
    if not value:
        return None
    if value == "none":
        return -1
    if value not in CPU_ISA_LEVELS:
        raise ValueError(f"{ENGINE_CPU_ISA}={value!r}; use one of: none, "
                         f"{', '.join(CPU_ISA_LEVELS)}")
    return CPU_ISA_LEVELS.index(value)
