"""Microbenchmark: the CPU linear kernel vs XLA at SmolLM2-135M's shapes (K=576).

For each N, T and weight format: XLA's dot on the float32 [K, N] weight, the kernel, and the
plain-JAX reference (dequantize + XLA's dot) of the same quantized weight; for int8 and GGUF
weights also the kernel with integer activations (x quantized per block of 32, the CPU
backend's default); best of 20 runs, in ms. Prints the load average: on a busy host the
figures mean little.

    python scripts/cpu_linear_bench.py            # both cores
    taskset -c 0 python scripts/cpu_linear_bench.py   # one core
"""

from __future__ import annotations

import functools
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.kernels import linear as kernels
from engine.model import quant

QTYPES = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def best_ms(f, *args, runs: int = 20) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    print(f"load average {os.getloadavg()}, {len(os.sched_getaffinity(0))} cores, "
          f"kernel ISA level {kernels.isa_level()}")
    rng = np.random.default_rng(0)
    k = 576
    xla = jax.jit(lambda x, w: jnp.einsum("te,ef->tf", x, w))
    ref = jax.jit(quant.reference_linear)
    int_x = functools.partial(kernels.linear, int_act=True)
    for n in (192, 576, 1536, 49152):
        w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.float32)  # [K, N]
        weights = {f: quant.pack(w, 1, f) for f in ("f32", "bf16", "int8")}
        for f, qt in QTYPES.items():
            raw = gguf.quants.quantize(np.asarray(w.T), qt)  # [N, row bytes]
            weights[f] = quant.from_gguf_rows(raw, f, (k,), (n,))
        for t in (1, 8, 32, 256):
            x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)  # [T, K]
            cells = [f"N={n:5d} T={t:2d} xla-f32 {best_ms(xla, x, w):8.3f}"]
            for f, qw in weights.items():
                ints = "" if f in ("f32", "bf16") else f"/{best_ms(int_x, x, qw):8.3f}"
                cells.append(f"{f} {best_ms(kernels.linear, x, qw):8.3f}{ints}"
                             f"/{best_ms(ref, x, qw):8.3f}")
            print(" | ".join(cells), "(kernel[/kernel integer x]/reference ms)")


if __name__ == "__main__":
    main()
