"""Run in a subprocess with several (forced) CPU devices: generate greedily at the given
tensor-parallel sizes and print one JSON line per size (tokens, logprobs, shardings).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.tp_worker \
        MODEL LOAD_FORMAT TP [TP ...]

With ENGINE_TEST_DIST=host:port,num_processes,process_id the process joins a multi-host
group (jax.distributed) and its mesh spans every process's devices. ENGINE_TEST_BACKEND
picks the backend (default cpu; cuda runs its Pallas kernels in the interpreter here);
ENGINE_TEST_EP=1 turns on expert parallelism; ENGINE_TEST_QUANT=METHOD quantizes at load.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from engine import LLM, SamplingParams
from engine.model.quant import QuantizedWeight
from engine.runner import model_forward

PROMPTS = [[5, 17, 29, 3, 11, 8, 40, 2, 9, 13, 21, 34], [7, 7, 1, 19], list(range(30, 60))]


def spec(a) -> list:
    """The array's PartitionSpec, one entry per dimension (jit drops trailing Nones); a
    QuantizedWeight's: its data's."""
    a = a.data if isinstance(a, QuantizedWeight) else a
    parts = [s if s is None or isinstance(s, str) else list(s) for s in a.sharding.spec]
    return parts + [None] * (a.ndim - len(parts))


def main(model: str, load_format: str, sizes: list[int]) -> None:
    dist = {}
    if os.environ.get("ENGINE_TEST_DIST"):
        addr, n, pid = os.environ["ENGINE_TEST_DIST"].split(",")
        dist = {"coordinator_address": addr, "num_processes": int(n), "process_id": int(pid)}
    backend = os.environ.get("ENGINE_TEST_BACKEND", "cpu")
    if backend == "cuda" and jax.default_backend() != "gpu":
        dist["interpret"] = True  # the Pallas interpreter on the CPU
        # (the preset's start-up warm-up would compile every interpreted program first)
        dist.update(warmup_decode_len=0, warmup_prompt_steps=False)
    if os.environ.get("ENGINE_TEST_EP"):
        dist["expert_parallel"] = True
    if os.environ.get("ENGINE_TEST_QUANT"):
        dist["quantization"] = os.environ["ENGINE_TEST_QUANT"]
        # Float activations: with the CPU's default integer activations, TP 1 (the C++
        # kernel) and TP > 1 (plain JAX under the mesh) flip a few roundings of x's
        # quantization, which moves logprobs by ~1e-3; the sharding is what is checked here.
        if backend == "cpu":
            dist["options"] = (("activations", "float"),)
    for tp in sizes:
        llm = LLM(model, backend=backend, dtype="float32", load_format=load_format,
                  tensor_parallel_size=tp, max_total_tokens=1024, max_running_requests=4,
                  chunked_prefill_size=64, **dist)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, logprobs=1))
        runner = llm.engine.runner
        layer = runner.params["layers"][0]
        k_cache = runner.kv[0][0]
        print(json.dumps({
            "tp": tp,
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                 strict=True)] for o in outs],
            "wq": spec(layer["wq"]) if tp > 1 and "wq" in layer else None,
            "wk": spec(layer["wk"]) if tp > 1 and "wk" in layer else None,
            "wqkv": spec(layer["wqkv"]) if tp > 1 and "wqkv" in layer else None,
            "w_down": spec(layer["w_down"]) if tp > 1 and "w_down" in layer else None,
            "w_gate_up": spec(layer["w_gate_up"]) if tp > 1 and "w_gate_up" in layer
            else None,
            "expert_gate": spec(layer["expert_gate"]) if tp > 1 and "expert_gate" in layer
            else None,
            "kv": spec(k_cache) if tp > 1 else None,
            "kv_devices": len(k_cache.sharding.device_set),
            "per_device_attention": runner.backend.attention_fn() != runner.backend.attention,
            "quantized": {n: [w.fmt, spec(w.data), spec(w.scales)] for n, w in layer.items()
                          if isinstance(w, QuantizedWeight) and tp > 1},
            "expert_axis": model_forward(runner.cfg, runner.backend).keywords["expert_axis"],
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]])
