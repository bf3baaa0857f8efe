"""A/B of the CPU linear paths through the whole default model (SmolLM2-135M, layers unrolled
as in configs/cpu.yaml), interleaved in one process, so a shared host's load hits every
variant alike. A forward of T tokens of one sequence at positions 0..T-1 (T=1: a batch-1
decode step; T=32: the linears of a batch-32 decode step); best of 12, ms.

    limits      the kernel only up to the per-format row limits used before 2026-12-03
                (f32 8 rows, quantized 16; wider quantized heads always), else plain JAX
    float-x     the kernel at every T, float activations
    int-x       the kernel at every T, integer activations for int8/GGUF (the default)
    no-linear   every projection replaced by zeros: what the rest of the step costs

    python scripts/cpu_linear_paths_ab.py gguf,int8,f32 1,32,128
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.attention import ragged_paged_attention
from backends.cpu.kernels import linear as kernels
from engine.attention import AttentionMetadata
from engine.loader import hub
from engine.loader.load import load_checkpoint
from engine.loader.quantize import quantize_params
from engine.model.llama import forward
from engine.model.quant import QuantizedWeight, int_activations_ok, reference_linear
from engine.model.weights import fuse_qkv, params_from_hf

LIMITS = {"f32": 8, "bf16": 8, "int8": 16, "q8_0": 16, "q4_0": 16, "q4_1": 16}
PAGE, PAGES = 16, 24


def main() -> None:
    methods, ts = sys.argv[1].split(","), [int(t) for t in sys.argv[2].split(",")]
    path = hub.fetch_model(hub.DEFAULT_MODEL, progress=False)
    ckpt = load_checkpoint(str(path), progress=False)
    cfg, isa = ckpt.config, kernels.isa_level()

    def limits(x: jax.Array, w: QuantizedWeight) -> jax.Array:
        if x.shape[0] > LIMITS.get(w.fmt, 0) and not (w.n >= 8192 and w.fmt != "f32"):
            return reference_linear(x, w)
        return kernels.kernel(x, w, isa)

    paths = {
        "limits": limits,
        "float-x": functools.partial(kernels.kernel, isa=isa),
        "int-x": lambda x, w: kernels.kernel(x, w, isa, int_activations_ok(w)),
        "no-linear": lambda x, w: jnp.zeros((x.shape[0], *w.out_shape), x.dtype),
    }
    shape = (PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]
    attend = functools.partial(ragged_paged_attention, scale=cfg.head_dim**-0.5)
    print(f"load average {os.getloadavg()}, kernel ISA level {isa}", flush=True)
    for method in methods:
        params = params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=False)
        fuse_qkv(params)
        params = quantize_params(params, cfg, method, path)
        for t in ts:
            pos = np.arange(t, dtype=np.int32)  # one sequence, slots = positions
            md = AttentionMetadata(
                positions=pos, slot_mapping=pos.copy(), token_seq=np.zeros(t, np.int32),
                query_start=np.array([0, t], np.int32), seq_lens=np.array([t], np.int32),
                page_table=np.arange(PAGES, dtype=np.int32)[None], num_tokens=np.int32(t),
                page_size=PAGE, decode_only=t == 1)
            args = (params, kv, pos + 100, md, np.array([t - 1], np.int32))
            fns = {name: jax.jit(functools.partial(forward, cfg=cfg, attend=attend, linear=lin))
                   for name, lin in paths.items()}
            best = dict.fromkeys(fns, float("inf"))
            for f in fns.values():
                f(*args)[0].block_until_ready()
            for _ in range(12):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f(*args)[0].block_until_ready()
                    best[name] = min(best[name], time.perf_counter() - t0)
            print(f"{method} T={t}: " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in best.items()),
                  flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
