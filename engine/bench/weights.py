"""`engine bench weights`: how long `LLM.update_weights` takes in-process from device arrays
(an RL trainer's parameters after a step), and that the next step compiles nothing.

Two forms of new weights, both made on the device with the serving shardings:
  float   the model's float tree as loaded (wq/wk/wv, unquantized): fusion and any
          quantization run on the device, as at load
  serving another copy in the serving form (fused, quantized): checked and swapped only
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from engine.compile import CompileCounter
from engine.model.weights import random_params, tree_bytes
from engine.sampling_params import SamplingParams


def float_weights(llm: Any, seed: int) -> Any:
    """Random float weights of the serving model, made on their shards (a trainer's)."""
    recipe = llm.engine.weight_recipe
    return random_params(recipe.cfg, jnp.dtype(recipe.dtype), scan=recipe.scan, seed=seed,
                         place=recipe.place)


def time_updates(llm: Any, repeats: int) -> dict[str, Any]:
    """Seconds per update (until the new weights are on the device), per form."""
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(prompt, sp)  # the step programs compile here, not in the timings
    out: dict[str, Any] = {"weight_bytes": tree_bytes(llm.engine.runner.params)}
    for form in ("float", "serving"):
        times = []
        for i in range(repeats):
            if form == "float":
                new = float_weights(llm, seed=100 + i)
            else:
                new = jax.tree.map(jnp.copy, llm.engine.runner.params)
            jax.block_until_ready(new)
            t0 = time.perf_counter()
            llm.update_weights(new)
            jax.block_until_ready(llm.engine.runner.params)
            times.append(time.perf_counter() - t0)
            del new
        out[form] = {"seconds": times, "median_s": statistics.median(times)}
    n = CompileCounter().compiles
    llm.generate(prompt, sp)
    out["step_compiles_after"] = CompileCounter.compiles - n
    return out


def report(out: dict[str, Any]) -> str:
    lines = [f"weights {out['weight_bytes'] / 1e9:.2f} GB on the device"]
    for form in ("float", "serving"):
        r = out[form]
        lines.append(f"update_weights ({form:7s}): median {r['median_s'] * 1e3:8.1f} ms  "
                     f"(runs: {', '.join(f'{s * 1e3:.1f}' for s in r['seconds'])} ms)")
    lines.append(f"step programs compiled by the next generate: {out['step_compiles_after']}")
    return "\n".join(lines)
