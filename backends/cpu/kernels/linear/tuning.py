"""When the CPU linear kernel runs: by weight format and the step's token count T.

Elsewhere the backend runs the plain-JAX reference: dequantize in XLA, then XLA's own dot (a
blocked GEMM that reuses each weight over many rows better than the kernel's 4-row tiles).
Measured 2026-12-03 with scripts/cpu_linear_bench.py on a 2-core AMD EPYC (AVX-512), other
work on the host (load average 11-14), best of 20 runs, so indicative only; K=576
(SmolLM2-135M), ms, kernel / reference of the same weight (XLA's dot on the float32 [K, N]
weight in brackets):
    N=576   T=1   f32 0.021/0.051  int8 0.023/0.039  q4_1 0.041/0.335  (0.051)
            T=8   f32 0.054/0.095  int8 0.038/0.127  q4_1 0.044/0.261  (0.055)
            T=32  f32 0.162/0.173  int8 0.254/0.170  q4_1 0.264/0.295  (0.153)
    N=1536  T=1   f32 0.056/0.063  int8 0.043/0.067  q4_1 0.075/1.77   (0.089)
            T=8   f32 0.079/0.184  int8 0.198/0.206  q4_1 0.215/0.501  (0.117)
            T=32  f32 0.435/0.436  int8 0.258/0.410  q4_1 0.692/0.464  (0.287)
    N=49152 T=1   f32 3.31/3.56    int8 0.82/0.72    q4_1 1.23/179     (7.57)
    (one core, taskset: N=49152 T=8 int8 24/264, q4_1 19/260; T=32 int8 100/368)
XLA fuses an int8 dequantization into a one-row dot well, but not the GGUF bit unpacking,
and none of them at several rows: for the head's wide N the kernel wins at every T.
"""

MAX_KERNEL_TOKENS = {"f32": 8, "bf16": 8, "int8": 16, "q8_0": 16, "q4_0": 16, "q4_1": 16}
"""Format -> the largest T the kernel runs at (prompt chunks use the reference)."""
WIDE_N = 8192
"""From this many outputs (the vocabulary head) up, quantized formats take the kernel at
any T: dequantizing the whole weight in XLA costs more than the kernel's passes."""
