"""CPU time of the attention alone at the offline shape: the oracle against the C++ kernel.

Usage: taskset -c 1 python scripts/bench_cpu_attention.py [--rows 32] [--ctx 96] [--iters 7]
       [--prompt] [--kv-dtype float32|bfloat16|float8_e4m3fn]

SmolLM2-135M's attention (Hq 9, Hkv 3, D 64, page 16) over its 30 layers' caches
([30, pages, 16, 3, 64] float32, each layer read in place), `rows` decode rows (one query per
sequence) at context `ctx`, or with --prompt one prompt chunk of `ctx` tokens. Prints the
fastest of `iters` runs' process CPU time (all threads; pin to one core for comparisons), the
two alternating (with a pause between runs: XLA's worker threads spin after a program, and
that CPU time would count against the next one), and the load average before and after.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.cpu.kernels import attention as kernels
from engine.attention import AttentionMetadata

LAYERS, HQ, HKV, D, PAGE = 30, 9, 3, 64, 16


def metadata(rows: int, ctx: int, prompt: bool, pages_per: int) -> AttentionMetadata:
    """Decode: token i is sequence i's last position; prompt: one sequence's ctx tokens."""
    perm = np.random.default_rng(0).permutation(rows * pages_per).astype(np.int32)
    table = perm.reshape(rows, pages_per)  # [S, P]
    if prompt:
        pos, seq, lens = np.arange(ctx), np.zeros(ctx), np.array([ctx])
        table = table[:1]
    else:
        pos, seq, lens = np.full(rows, ctx - 1), np.arange(rows), np.full(rows, ctx)
    t = len(pos)
    return AttentionMetadata(
        positions=pos.astype(np.int32), slot_mapping=np.zeros(t, np.int32),
        token_seq=seq.astype(np.int32), query_start=np.arange(len(lens) + 1, dtype=np.int32),
        seq_lens=lens.astype(np.int32), page_table=table, num_tokens=np.int32(t),
        page_size=PAGE, decode_only=not prompt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=96)
    ap.add_argument("--prompt", action="store_true")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--kv-dtype", default="float32")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    pages_per = -(-args.ctx // PAGE)
    md = metadata(args.rows, args.ctx, args.prompt, pages_per)
    rng = np.random.default_rng(1)
    shape = (LAYERS, args.rows * pages_per, PAGE, HKV, D)
    k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)).astype(args.kv_dtype)
            for _ in range(2))
    q = jnp.asarray(rng.standard_normal((len(md.positions), HQ, D), np.float32))
    isa = kernels.isa_level()

    def all_layers(attend, q, k, v, md):  # every layer's attention, summed: [T, Hq, D]
        return sum(attend(q, k, v, md, scale=D**-0.5, layer=jnp.int32(i)) for i in range(LAYERS))
    fns = {"oracle": jax.jit(functools.partial(all_layers, oracle)),
           f"kernel (isa {isa})": jax.jit(functools.partial(
               all_layers, functools.partial(kernels.kernel, isa=isa)))}
    outs = [np.asarray(f(q, k, v, md)) for f in fns.values()]  # compile; check they agree
    err = np.abs(outs[0] - outs[1]).max()
    print(f"{args.kv_dtype} cache; max |oracle - kernel| over {LAYERS} layers: {err:.2e}")
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.iters):
        for name, f in fns.items():
            time.sleep(0.2)  # XLA's worker threads spin a while after a program: let them stop
            c0 = time.process_time()
            jax.block_until_ready(f(q, k, v, md))
            best[name] = min(best[name], time.process_time() - c0)
    what = f"prompt of {args.ctx}" if args.prompt else f"{args.rows} decode rows at ctx {args.ctx}"
    for name, s in best.items():
        print(f"{what}, {LAYERS} layers, {name}: {s * 1e3:.2f} ms CPU")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
