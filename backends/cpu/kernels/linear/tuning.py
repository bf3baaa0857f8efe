"""Where the CPU linear kernel's choices come from (measurements; the constants are in
linear.cc: kTile 4 weight rows, register tiles of 4 (AVX-512) or 2 (AVX2) x rows, kRowChunk
64 x rows per pass, kDirectRows 4; packed.cc: tiles of 16 columns, register tiles of 4 rows
by 2 tiles, 1-2 rows by up to 4 tiles).

Since 2026-12-04, with VNNI (level 3 and up) and integer activations, the CPU backend packs
q4_0, q4_1, q8_0 and int8 weights once at load (engine.model.packed) and one kernel
(packed.cc) runs every row count on them, in place of the direct dots up to 4 rows
(DotDirectVnni: ~15 instructions per 32 weights, bound by instructions, not memory) and of
the per-call repacking above 4 rows (PackTileVnni, 16% of a 32-row step's CPU). One core
(taskset -c 1), CPU time, best of 30, A/B in the same minutes, scripts/cpu_step_linears.py
(its 2.2 MB of layer weights stay in cache: instruction figures): 30 layers of Q4_1 at 1
row 5.9-6.0 -> 0.71-0.72 ms, the Q8_0 LM head 1.60 -> 0.59-0.63 ms; at 32 rows 14.2 -> 9.5-9.7
ms and 8.0-8.5 -> 3.3 ms. Whole steps of the Q4_1 GGUF model (scripts/profile_cpu_step.py
--only-step --quantization gguf, taskset -c 1, CPU time, best of 30, host shared, A/B):
batch-1 engine.step 8.8-9.0 -> 4.9 ms, batch 32 57.4-58.1 -> 40.0-41.5 ms (-29%). The
paths below stay for the other formats and levels.

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
unpacked in registers and dotted as integers (about 1.2-2x the float decode). From 5 rows the
row-by-row integer dots lost to the float tiles (each column's block sum needed its own
int32 -> float conversion and scale); since 2026-12-03 (night), with VNNI, int8/Q8_0/Q4_0/
Q4_1 take register tiles of kVnniRows 4 x rows by kVnniCols 32 columns, one column per int32
lane, so a block costs one conversion and scale per 16 columns. The same host, load average
9-14 (other work), one core (taskset), CPU time, best of 30: 30 layers of SmolLM2's Q4_1
linears at 32 rows 21.5-23.2 ms (VNNI tiles) vs 51.3-57.9 ms (float tiles,
ENGINE_CPU_ISA=avx512); the Q8_0 LM head [49152, 576] at 32 rows 10.1-11.0 vs 15.4-17.0 ms
(scripts/cpu_step_linears.py). Other formats and the K-quants keep the
float tiles above 4 rows. A batch-1 variant that reduced 8 Q4 blocks per conversion (gathered
f16 scales, hadd tree) took 8.8-9.1 ms for the 30 layers at 1 row vs 7.0-7.3 ms for the
per-block dots, so it was not kept.
"""
