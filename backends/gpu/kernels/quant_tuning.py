"""Tuned launch parameters of the quantized GEMM kernels (quant_linear.py), as data.

TUNED maps (scheme, m, k, n) to (block_m, block_n, block_k, splits, num_warps, num_stages,
gemv): the fastest configuration `scripts/gpu/quant_bench.py gemm` found on the H200 for a
GEMM of m rows, K = k, N = n. Schemes: "int4" and "int8" (weight-only), "fp8w" (fp8
weights, bf16 activations: weight-only), "w8a8" (fp8 weights and per-token fp8
activations). m is the sweep's row count (1, 8, 32, 64); a call of M rows takes the entry of
the smallest swept m >= M (M_BUCKETS). splits 0: K split until about target_programs
programs run. gemv 1: block_m 1, the dot as multiply-and-sum on the CUDA cores (one program
per row; no tensor-core tile padded from 1 row to 16). int4's block_k is always G/2 bytes
(one group per step) whatever the entry says.

A shape or row count without an entry takes the prior of quant_linear.prior_sizes. The
sweep (`scripts/gpu/quant.sh gemm`, its quant_tuning_paste.txt) prints its winners as
lines to paste into TUNED below, which is empty until the H200 sweep of issue 18 is pasted
in, and a FP8_WEIGHT_ONLY_MAX_M line to replace the one below. The keys name no device:
ROCm's Triton backend shares this table.
"""

from __future__ import annotations

M_BUCKETS = (1, 8, 32, 64)
"""The row counts the sweep measures; TUNED's m is one of them."""

FP8_WEIGHT_ONLY_MAX_M = 16
"""fp8 weights with fp8_gemm 'auto': up to this many rows the weight-only kernel (bf16
activations, no per-token quantization kernel before each GEMM; decode at small batch is
bound by the weight bytes, so FP8 tensor cores buy nothing there), W8A8 above. A prior
(2026-12-03): the sweep prints both paths side by side at M = 1, 8, 32, 64."""

TUNED: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int, int]] = {
    # (scheme, m, k, n): (block_m, block_n, block_k, splits, num_warps, num_stages, gemv)
}


def bucket(m: int) -> int | None:
    """The swept row count whose entry serves M rows, or None above the largest."""
    return next((b for b in M_BUCKETS if m <= b), None)
