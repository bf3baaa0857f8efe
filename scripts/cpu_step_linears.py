"""The linear kernel alone at a SmolLM2-135M decode step's shapes, chained as a step chains them.

Usage: python scripts/cpu_step_linears.py [ROWS]     (taskset -c 1 for one core's figures)

30 layers x (q/k/v fused [576 -> 960], o [576 -> 576], gate and up [576 -> 1536], down
[1536 -> 576]) as random Q4_1 blocks, and the LM head [576 -> 49152] as Q8_0 (the default
GGUF file's types), each call fed from the previous output so nothing runs ahead; integer
activations (the CPU backend's default for GGUF weights). ISA=N in the environment picks
the kernel level (default: the best here); from level 3 the weights are packed for VNNI as
the backend packs them at load (q4_1x, q8_0x), unless PACKED=0. Prints wall and
process-CPU ms (best and median of 30), the weight bytes per pass, and a one-thread 256 MiB
copy's rate, with the load average: figures taken beside other work are indicative only.
The five layer weights (2.2 MB) are the same for all 30 layers, so they stay in cache: the
figures are the kernel's instructions, not the memory traffic of a real step.
"""

from __future__ import annotations

import os
import sys
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.kernels import linear as kernels
from engine.model import quant

SHAPES = ((576, 960), (576, 576), (576, 1536), (576, 1536), (1536, 576))  # (K, N) per layer


def timed(fn, *args, runs: int = 30) -> str:
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return (f"wall best {min(wall) * 1e3:.2f} median {np.median(wall) * 1e3:.2f} ms, "
            f"cpu best {min(cpu) * 1e3:.2f} median {np.median(cpu) * 1e3:.2f} ms")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    isa = int(os.environ.get("ISA", kernels.isa_level()))
    rng = np.random.default_rng(0)
    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    ws = [quant.from_gguf_rows(gguf.quants.quantize(
        (rng.standard_normal((n, k)) * 0.02).astype(np.float32), q41), "q4_1", (k,), (n,))
        for k, n in SHAPES]
    emb = (rng.standard_normal((49152, 576)) * 0.02).astype(np.float32)  # [V, E]
    head = quant.from_gguf_rows(gguf.quants.quantize(emb, q80), "q8_0", (576,), (49152,))

    @jax.jit
    def layers(x, ws):  # x [T, 576]
        for _ in range(30):
            h = x
            for w in ws:  # each call reads the previous one's output (none is dead code)
                reps = -(-w.k // h.shape[1])
                src = (h if reps == 1 else jnp.tile(h, (1, reps)))[:, :w.k]
                h = kernels.kernel(src, w, isa, True)  # [T, N]
            x = x + 1e-3 * h  # down's output [T, 576]
        return x

    if isa >= 3 and os.environ.get("PACKED", "1") != "0":
        ws, head = [quant.pack_tiles(w) for w in ws], quant.pack_tiles(head)
    lm_head = jax.jit(lambda x, h: kernels.kernel(x, h, isa, True))
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    layer_bytes = sum(int(w.data.nbytes) for w in ws) * 30
    print(f"ISA level {isa}, {rows} rows, load average {os.getloadavg()}")
    print(f"30 layers ({layer_bytes / 1e6:.1f} MB of {ws[0].fmt}): {timed(layers, x, ws)}")
    print(f"LM head ({head.data.nbytes / 1e6:.1f} MB of {head.fmt}): {timed(lm_head, x, head)}")
    a = np.ones(64 * 2**20, np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = min(_copy(a, b) for _ in range(10))
    print(f"one-thread copy: {2 * a.nbytes / best / 1e9:.1f} GB/s (read + write)")


def _copy(a: np.ndarray, b: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(b, a)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
