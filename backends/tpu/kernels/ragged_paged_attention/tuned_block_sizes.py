"""Block sizes of the ragged paged attention kernel, as data.

NOT MEASURED ON HARDWARE. No TPU was available when this table was written: every entry is
a starting point from VMEM arithmetic (a K/V block of about 256-512 tokens, double
buffered, inside the default scoped VMEM of the chip), not the winner of a sweep. Replace
entries with measured values (docs/tpu.md says how); a YAML option overrides them per run.

Keys: (chip, cache dtype, head_dim, page_size). Values: (kv_tokens_per_block,
queries_per_block). Lookup falls back to the chip's row with page_size None, then to
DEFAULT.
"""

from __future__ import annotations

import dataclasses

Key = tuple[str, str, int, int | None]

TUNED: dict[Key, tuple[int, int]] = {
    # v5e: 16 MiB default scoped VMEM, 128x128 MXU.
    ("v5e", "bfloat16", 128, None): (512, 32),
    ("v5e", "bfloat16", 64, None): (512, 32),
    ("v5e", "float32", 128, None): (256, 32),
    ("v5e", "float32", 64, None): (256, 32),
    # v6e: 32 MiB default scoped VMEM, 256x256 MXU: longer K/V blocks.
    ("v6e", "bfloat16", 128, None): (1024, 64),
    ("v6e", "bfloat16", 64, None): (1024, 64),
    ("v6e", "float32", 128, None): (512, 32),
    ("v6e", "float32", 64, None): (512, 32),
    # Interpret mode on a CPU host: the interpreter's cost is per grid step and per loop
    # iteration, so fewer, larger blocks run faster there.
    ("interpret", "bfloat16", 128, None): (64, 32),
    ("interpret", "float32", 128, None): (64, 32),
    ("interpret", "bfloat16", 64, None): (64, 32),
    ("interpret", "float32", 64, None): (64, 32),
}

DEFAULT: tuple[int, int] = (256, 32)

VMEM_BUDGET_BYTES: dict[str, int] = {
    "v5e": 12 * 2**20,  # of the 16 MiB default scoped limit, leaving room for Mosaic
    "v6e": 24 * 2**20,  # of the 32 MiB default scoped limit
    "interpret": 64 * 2**20,
}
DEFAULT_VMEM_BUDGET = 12 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    kv_pages_per_block: int
    """Pages of K (and of V) fetched per block; a block holds kv_pages_per_block * page."""
    queries_per_block: int
    """Query tokens per grid step (a multiple of 16, the bf16 sublane tile; the token count
    is padded to it)."""
    kv_heads_per_block: int
    """KV heads per grid step (a divisor of the KV head count)."""


def chip_name(device_kind: str) -> str:
    """'TPU v5 lite' / 'TPU v5e' -> 'v5e', 'TPU v6 lite' / 'TPU v6e' -> 'v6e', else as is."""
    kind = device_kind.lower()
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return "v5e"
    if "v6 lite" in kind or "v6e" in kind:
        return "v6e"
    return kind


def vmem_bytes(bs: BlockSizes, *, page_size: int, head_dim: int, num_q_per_kv: int,
               itemsize: int) -> int:
    """VMEM the kernel allocates for these block sizes (scratch + double-buffered q/o)."""
    rows = bs.kv_heads_per_block * num_q_per_kv * bs.queries_per_block
    kv = 2 * 2 * bs.kv_pages_per_block * bs.kv_heads_per_block * page_size * head_dim * itemsize
    state = rows * (2 * 128 + head_dim) * 4  # m, l (lane-replicated) and acc, f32
    q_o = 2 * 2 * rows * head_dim * itemsize
    scores = rows * bs.kv_pages_per_block * page_size * 4 * 2  # s and p, f32
    return kv + state + q_o + scores


def get_block_sizes(chip: str, dtype: str, *, head_dim: int, page_size: int, num_kv_heads: int,
                    num_q_per_kv: int, num_tokens: int, pages_per_seq: int,
                    itemsize: int) -> BlockSizes:
    """Table lookup, clipped to this batch's shapes and shrunk to fit the VMEM budget."""
    kv_tokens, bq = TUNED.get(
        (chip, dtype, head_dim, page_size),
        TUNED.get((chip, dtype, head_dim, None), DEFAULT))
    npb = max(1, min(kv_tokens // page_size, pages_per_seq))
    bq = max(16, min(bq, -(-num_tokens // 16) * 16))
    hb = num_kv_heads
    budget = VMEM_BUDGET_BYTES.get(chip, DEFAULT_VMEM_BUDGET)

    def fits(npb: int, hb: int) -> bool:
        bs = BlockSizes(npb, bq, hb)
        return vmem_bytes(bs, page_size=page_size, head_dim=head_dim,
                          num_q_per_kv=num_q_per_kv, itemsize=itemsize) <= budget

    # Fewer heads per step first (same DMA count per page head), then shorter K/V blocks.
    while not fits(npb, hb) and hb > 1:
        hb = max(d for d in range(1, hb) if num_kv_heads % d == 0)
    while not fits(npb, hb) and npb > 1:
        npb //= 2
    return BlockSizes(kv_pages_per_block=npb, queries_per_block=bq, kv_heads_per_block=hb)
