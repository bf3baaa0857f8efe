"""When the CPU linear kernel runs: by weight format, the largest token count T of a step.

Above it the backend dequantizes the weight in XLA and uses XLA's own dot (a blocked GEMM
that reuses each weight over many rows better than the kernel's 4-row tiles). From a
microbenchmark of 2026-12-03 on a 2-core AMD EPYC (AVX-512; load average ~8, so indicative
only) at SmolLM2-135M's shapes (K=576; N=192, 576, 1536, 49152), in ms, XLA float32 dot vs
the kernel:
    T=1:  N=1536 1.10 vs f32 0.35 / bf16 0.14 / int8 0.25;  N=49152 16.9 vs 27.0 / 11.6 / 9.3
          N=576  0.07 vs 0.19 / 0.22 / 0.26 (small layers: the call and thread hand-off cost)
    T=8:  N=1536 0.18 vs 1.13 / 1.32 / 1.25;  N=49152 48.9 vs 84.8 / 58.5 / 32.9
    T=32: N=1536 0.81 vs 3.98 / 4.87 / 3.96;  N=49152 60.4 vs 81.4 / 128 / 84.3
Plain float32 weights stay on XLA's dot (they are not packed for the kernel); quantized ones
take the kernel for decode-sized steps.
"""

MAX_KERNEL_TOKENS = {"f32": 1, "bf16": 4, "int8": 4, "q8_0": 4, "q4_0": 4, "q4_1": 4}
"""Format -> the largest T the kernel runs at; larger steps dequantize and use XLA's dot."""
