"""Pallas TPU ragged paged attention (our kernel; kernel.py says why not JAX's)."""

from backends.tpu.kernels.ragged_paged_attention.kernel import (
    dynamic_validate_inputs,
    from_oracle_layout,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    static_validate_inputs,
    to_oracle_layout,
)
from backends.tpu.kernels.ragged_paged_attention.tuned_block_sizes import (
    BlockSizes,
    get_block_sizes,
)

__all__ = [
    "BlockSizes",
    "dynamic_validate_inputs",
    "from_oracle_layout",
    "get_block_sizes",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "static_validate_inputs",
    "to_oracle_layout",
]
