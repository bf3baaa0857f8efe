"""When the CPU linear kernel runs: by weight format, the largest token count T of a step.

Above it the backend dequantizes the weight in XLA and uses XLA's own dot (a blocked GEMM
that reuses each weight over many rows better than the kernel's 4-row tiles). Measured
2026-12-03 on a 2-core AMD EPYC (AVX-512) pinned to one core (taskset), other work on the
host (load average ~15), best of 20-30 runs, so indicative only; K=576 (SmolLM2-135M), ms,
kernel vs the plain-JAX reference (dequantize + XLA dot) of the same weight:
    q4_1  N=1536:  T=1 0.08 vs 1.74;  T=8 0.21 vs 0.46
          N=49152: T=1 2.3 vs 232;    T=8 19 vs 260
    q8_0  N=49152: T=1 2.0 vs 49;     T=8 34 vs 225
    int8  N=1536:  T=1 0.056 vs 0.052; T=8 0.20 vs 0.22; T=32 0.71 vs 0.43
          N=49152: T=1 1.8 vs 1.3;    T=8 24 vs 264;   T=32 100 vs 368
    f32   N=49152: T=1 11.5 vs XLA's dot on the [K, N] weight 4.6 (XLA wins: float32
          weights are not packed for the kernel)
XLA fuses an int8 dequantization into a one-row dot well, but not the GGUF bit unpacking,
and not any of them at several rows.
"""

MAX_KERNEL_TOKENS = {"f32": 1, "bf16": 4, "int8": 64, "q8_0": 64, "q4_0": 64, "q4_1": 64}
"""Format -> the largest T the kernel runs at; larger steps (prompt chunks) dequantize and
use XLA's dot."""
