"""Expert parallelism on forced CPU devices: prints one JSON line per (mode, ep) with the
largest logit difference from the unsharded model. Run by test_moe_ep.py in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=8), as the device count is fixed when
JAX starts.

Modes: "gspmd" shards the expert axis and lets XLA partition the model (expert_axis=None);
"shard_map" does the same with the model's explicit shard_map path (expert_axis="ep");
"expert_mlp" shards the experts' width instead (tensor-parallel experts, XLA partitions).
"""

from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from backends.cpu.attention import ragged_paged_attention
from backends.cpu.backend import CpuBackend
from engine.attention import AttentionMetadata
from engine.model.axes import param_axes
from engine.model.config import ModelConfig
from engine.model.llama import forward
from engine.model.weights import random_params

CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, head_dim=16,
                      intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(model_type="mixtral", vocab_size=256, hidden_size=64,
                    intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}
IDS = [3, 17, 99, 254, 8, 8, 42, 1, 0, 77, 130, 5, 61, 200, 19, 23, 7, 88, 150, 31, 2]
RULES = {"gspmd": {"expert": "ep"}, "shard_map": {"expert": "ep"},
         "expert_mlp": {"expert_mlp": "ep"}}


def place(params, mesh: Mesh, rules: dict[str, str]):
    def put(a, axes):
        spec = PartitionSpec(*(rules.get(n) if n else None for n in axes))
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(put, params, param_axes(params),
                        is_leaf=lambda x: isinstance(x, jax.Array))


def run(name: str, scan: bool) -> None:
    cfg = ModelConfig.from_hf(CONFIGS[name])
    params = random_params(cfg, jnp.float32, scan=scan, seed=1)
    # Random init routes near-uniformly; a larger router makes the choice of experts matter.
    scale = lambda lp: {**lp, "router": 20.0 * lp["router"]}
    params["layers"] = scale(params["layers"]) if scan else list(map(scale, params["layers"]))
    page, n = 4, len(IDS)
    num_pages = -(-n // page) + 1
    md = AttentionMetadata.one_sequence(0, n, np.arange(num_pages, dtype=np.int32)[None, :],
                                        page, num_pages)
    tokens = np.zeros(md.positions.shape[0], np.int32)
    tokens[:n] = IDS
    attend = functools.partial(ragged_paged_attention, scale=cfg.head_dim**-0.5)
    kv = CpuBackend().allocate_kv(cfg, num_pages, page, jnp.float32, scan=scan)
    rows = np.arange(n, dtype=np.int32)

    def logits(p, expert_axis=None):
        fwd = jax.jit(functools.partial(forward, cfg=cfg, attend=attend,
                                        expert_axis=expert_axis))
        compiled = fwd.lower(p, kv, tokens, md, rows).compile()
        return np.asarray(compiled(p, kv, tokens, md, rows)[0]), compiled.as_text()

    base, _ = logits(params)
    for ep in [n for n in (2, 4, 8) if n <= jax.device_count()]:
        mesh = Mesh(np.array(jax.devices()[:ep]), ("ep",))
        for mode, rules in RULES.items():
            placed = place(params, mesh, rules)
            lp = placed["layers"] if scan else placed["layers"][0]
            with jax.set_mesh(mesh):
                out, hlo = logits(placed, "ep" if mode == "shard_map" else None)
            # A float all-gather would mean the expert weights are gathered, not split.
            gathers = re.findall(r"= (\w+)\[[\d,]*\][^ ]* all-gather\(", hlo)
            print(json.dumps({
                "arch": name, "scan": scan, "mode": mode, "ep": ep,
                "err": float(np.abs(out - base).max()), "scale": float(np.abs(base).max()),
                "shard_shape": list(lp["expert_gate"].addressable_shards[0].data.shape),
                "gather_dtypes": sorted(set(gathers)),
            }), flush=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        arch, scan = arg.split(":")
        run(arch, scan == "scan")
