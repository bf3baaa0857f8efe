"""Tuned launch parameters of the quantized GEMM kernels (quant_linear.py), as data.

TUNED maps (scheme, m, k, n) to (block_m, block_n, block_k, splits, num_warps, num_stages,
gemv): the fastest configuration `scripts/gpu/quant_bench.py gemm` found on the H200 for a
GEMM of m rows, K = k, N = n. Schemes: "int4" and "int8" (weight-only), "fp8w" (fp8
weights, bf16 activations: weight-only), "w8a8" (fp8 weights and per-token fp8
activations). m is the sweep's row count (M_BUCKETS); a call of M rows takes the entry of
the smallest swept m >= M. The engine's steps on a GPU have at least 16 rows (its smallest
token bucket: a batch-1 decode step runs its GEMMs at M = 16, H200 profile of 2026-12-04),
so the M = 1 entries below serve only direct calls; the decode steps' tuning is M = 16's.
splits 0: K split until about target_programs programs run. gemv 1: block_m 1, the dot as
multiply-and-sum on the CUDA cores (one program per row; no tensor-core tile padded from 1
row to 16). int4's block_k is always G/2 bytes (one group per step) whatever the entry says.

A shape or row count without an entry takes the prior of quant_linear.prior_sizes. The
sweep (`scripts/gpu/quant.sh gemm`, its quant_tuning_paste.txt) prints its winners as
lines to paste into TUNED below, and a FP8_WEIGHT_ONLY_MAX_M line to replace the one
below. The keys name no device:
ROCm's Triton backend shares this table.
"""

from __future__ import annotations

M_BUCKETS = (1, 8, 16, 32, 64)
"""The row counts the sweep measures; TUNED's m is one of them. 16: a batch-1 decode step."""

FP8_WEIGHT_ONLY_MAX_M = 1
"""fp8 weights with fp8_gemm 'auto': up to this many rows the weight-only kernel (bf16
activations, no per-token quantization kernel before each GEMM; decode at small batch is
bound by the weight bytes, so FP8 tensor cores buy nothing there), W8A8 above. H200,
2026-12-03, each path's best tiles over the five 8B shapes: M=1 weight-only 222.4 us vs
W8A8 220.8 us (a tie), M=8 256.7 vs 217.7 us (W8A8 faster). Whole decode steps agree
(2026-12-04, scripts/gpu/decode_fusions.py with PROBE_FP8_WO_MAX_M=64): weight-only 3.97 ms
vs W8A8 3.49 at batch 1 (16 rows), 8.60 vs 6.86 at 64, though W8A8 spends about 0.45 ms of
its batch-1 step quantizing activations (some 350 small XLA kernels)."""

TUNED: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int, int]] = {
    # (scheme, m, k, n): (block_m, block_n, block_k, splits, num_warps, num_stages, gemv)
    # H200, 2026-12-03, `GEMM_BUDGET_S=120 scripts/gpu/quant.sh gemm` (M=1 and part of M=8
    # swept before the budget ran out); the fused gate+up weight (N=28672) takes N=14336's
    # winner, which the sweep measured before gate and up were fused.
    ('fp8w', 1, 4096, 4096): (16, 128, 128, 0, 4, 4, 0),  # 14.3 us (prior 20.0)
    ('fp8w', 1, 4096, 6144): (1, 128, 128, 0, 8, 4, 1),  # 18.7 us (prior 20.9)
    ('fp8w', 1, 4096, 14336): (16, 64, 128, 0, 4, 3, 0),  # 28.2 us (prior 36.2)
    ('fp8w', 1, 14336, 4096): (16, 64, 128, 0, 4, 3, 0),  # 25.6 us (prior 26.5)
    ('fp8w', 8, 14336, 4096): (16, 32, 256, 0, 4, 3, 0),  # 26.7 us (prior 31.7)
    ('int4', 1, 4096, 4096): (1, 128, 64, 0, 4, 3, 1),  # 12.4 us (prior 15.8)
    ('int4', 1, 4096, 6144): (1, 128, 128, 0, 8, 4, 1),  # 14.5 us (prior 15.2)
    ('int4', 1, 4096, 14336): (1, 64, 256, 0, 4, 3, 1),  # 31.0 us (prior 32.7)
    ('int4', 1, 14336, 4096): (16, 128, 128, 0, 4, 4, 0),  # 30.4 us (prior 33.3)
    ('int4', 8, 4096, 14336): (16, 128, 128, 0, 4, 4, 0),  # 35.7 us (prior 37.5)
    ('int8', 1, 4096, 4096): (1, 128, 128, 0, 8, 4, 1),  # 10.7 us (prior 20.1)
    ('int8', 1, 4096, 6144): (1, 128, 64, 0, 4, 3, 1),  # 15.9 us (prior 21.2)
    ('int8', 1, 4096, 14336): (1, 16, 512, 1, 4, 3, 1),  # 25.4 us (prior 26.2)
    ('int8', 1, 4096, 128256): (16, 128, 128, 0, 4, 4, 0),  # 147.6 us (prior 194.2)
    ('int8', 1, 14336, 4096): (16, 128, 128, 0, 4, 4, 0),  # 24.0 us (prior 27.5)
    ('int8', 8, 4096, 6144): (16, 128, 128, 0, 4, 4, 0),  # 13.7 us (prior 18.0)
    ('int8', 8, 4096, 128256): (16, 128, 128, 0, 4, 4, 0),  # 146.1 us (prior 155.4)
    ('w8a8', 1, 4096, 6144): (16, 128, 128, 0, 4, 4, 0),  # 14.7 us (prior 20.1)
    ('w8a8', 1, 4096, 14336): (16, 128, 128, 0, 4, 4, 0),  # 29.4 us (prior 43.2)
    ('w8a8', 1, 14336, 4096): (16, 128, 128, 0, 4, 4, 0),  # 29.9 us (prior 49.1)
    ('w8a8', 8, 4096, 4096): (16, 32, 256, 0, 4, 3, 0),  # 20.8 us (prior 22.1)
    ('w8a8', 8, 4096, 14336): (16, 32, 256, 0, 4, 3, 0),  # 24.2 us (prior 31.2)
    ('fp8w', 1, 4096, 28672): (16, 64, 128, 0, 4, 3, 0),  # gate+up fused: N=14336's
    ('int4', 1, 4096, 28672): (1, 64, 256, 0, 4, 3, 1),  # gate+up fused: N=14336's
    ('int4', 8, 4096, 28672): (16, 128, 128, 0, 4, 4, 0),  # gate+up fused: N=14336's
    ('int8', 1, 4096, 28672): (1, 16, 512, 1, 4, 3, 1),  # gate+up fused: N=14336's
    ('w8a8', 1, 4096, 28672): (16, 128, 128, 0, 4, 4, 0),  # gate+up fused: N=14336's
    ('w8a8', 8, 4096, 28672): (16, 32, 256, 0, 4, 3, 0),  # gate+up fused: N=14336's
}


def bucket(m: int) -> int | None:
    """The swept row count whose entry serves M rows, or None above the largest."""
    return next((b for b in M_BUCKETS if m <= b), None)
