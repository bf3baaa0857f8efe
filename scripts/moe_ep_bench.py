"""One MoE layer (Qwen3-30B-A3B shapes, bf16) on all visible devices: unsharded vs the
experts split over them (XLA's own partitioning of ragged_dot, the model's shard_map path)
vs each expert's width split; max difference from unsharded, ms per call, and the
all-gathers in the compiled program (a gathered expert weight means no expert parallelism).

    python -m scripts.moe_ep_bench [TOKENS ...]     (default: 64 4096)
"""

from __future__ import annotations

import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.model.config import ModelConfig
from engine.model.moe import moe_ffn

CFG = ModelConfig.from_hf(dict(
    model_type="qwen3_moe", vocab_size=1024, hidden_size=2048, head_dim=128,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=1,
    num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True))


def bench(f, *args, n=20):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def main(tokens: list[int]) -> None:
    e, x, fx = CFG.hidden_size, CFG.num_experts, CFG.moe_intermediate_size
    k = jax.random.split(jax.random.key(0), 5)
    lp = {"router": jax.random.normal(k[0], (e, x)) * 0.05,
          "expert_gate": jax.random.normal(k[1], (x, e, fx)) * 0.02,
          "expert_up": jax.random.normal(k[2], (x, e, fx)) * 0.02,
          "expert_down": jax.random.normal(k[3], (x, fx, e)) * 0.02}
    lp = jax.tree.map(lambda a: a.astype(jnp.bfloat16), lp)
    n_dev = jax.device_count()
    print(jax.devices(), flush=True)
    for t in tokens:
        h = jax.random.normal(k[4], (t, e), jnp.bfloat16)
        f1 = jax.jit(lambda lp, h: moe_ffn(lp, h, CFG))
        base = np.asarray(f1(lp, h), np.float32)
        print(f"T={t} unsharded 1 device: {bench(f1, lp, h):.3f} ms", flush=True)
        mesh = Mesh(np.array(jax.devices()), ("ep",))
        hr = jax.device_put(h, NamedSharding(mesh, PartitionSpec()))
        specs = {"gspmd": PartitionSpec("ep"), "shard_map": PartitionSpec("ep"),
                 "expert_mlp": {"expert_gate": PartitionSpec(None, None, "ep"),
                                "expert_up": PartitionSpec(None, None, "ep"),
                                "expert_down": PartitionSpec(None, "ep")}}
        for mode, sp in specs.items():
            spec = lambda n, sp=sp: (PartitionSpec() if n == "router" else
                                     sp[n] if isinstance(sp, dict) else sp)
            placed = {n: jax.device_put(a, NamedSharding(mesh, spec(n))) for n, a in lp.items()}
            axis = "ep" if mode == "shard_map" else None
            with jax.set_mesh(mesh):
                f = jax.jit(lambda lp, h, axis=axis: moe_ffn(lp, h, CFG, axis))
                compiled = f.lower(placed, hr).compile()
                out = np.asarray(compiled(placed, hr), np.float32)
                ms = bench(compiled, placed, hr)
            hlo = compiled.as_text()
            lines = [ln for ln in hlo.splitlines() if re.search(r"all-gather(-start)?\(", ln)]
            gathers = sorted({ln.split("=")[1].split("all-gather")[0].strip()[:60]
                              for ln in lines})
            ops = {o: len(re.findall(o + r"(-start)?\(", hlo))
                   for o in ("all-gather", "all-reduce", "reduce-scatter", "custom-call")}
            err = np.abs(out - base).max() / np.abs(base).max()
            print(f"T={t} ep={n_dev} {mode}: {ms:.3f} ms, rel err {err:.2e}, "
                  f"all-gathers {gathers}, ops {ops}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 4096])
