"""Where the CPU linear kernel's choices come from (measurements; the constants are in
linear.cc: kTile 4 weight rows, register tiles of 4 (AVX-512) or 2 (AVX2) x rows, kRowChunk
64 x rows per pass, kDirectRows 4).

Since 2026-12-03 the backend runs the kernel at every step size and for every format (the
earlier per-format row limits, past which XLA's dot or the plain-JAX dequantize-and-dot ran,
are gone). scripts/cpu_linear_bench.py, 2-core AMD EPYC (AVX-512 VNNI), other work on the
host (load average 9-13), best of 25 interleaved runs, so indicative only; K=576 or 1536
(SmolLM2-135M), ms, XLA's dot on float32 / the kernel on the same f32 weights | q4_1 blocks:
kernel with float x / with integer x / plain-JAX reference:
    K=576  N=1536  T=1    0.064 / 0.042 | 0.038 / 0.034 / 1.42
                   T=8    0.140 / 0.082 | 0.067 / 0.070 / 0.46
                   T=32   0.367 / 0.293 | 0.211 / 0.226 / 0.69
                   T=256  2.19  / 1.74  | 1.51  / 1.55  / 2.52
    K=1536 N=576   T=256  2.26  / 1.68  | 2.31  / 2.18  / 2.81
    K=576  N=49152 T=1    4.76  / 3.11  | 1.18  / 0.95  / 107
                   T=64   46.0  / 48.6  | 52.1  / 61.3  / 171
Integer x (activations quantized per block of 32) pays at 1 row, where the weight blocks are
unpacked in registers and dotted as integers (about 1.2-2x the float decode); from 5 rows the
quantized x takes the float tiles (the per-block int32 -> float conversion and scale of the
integer dots cost as much as AVX-512 FMAs on this CPU, which has no AMX).
"""
