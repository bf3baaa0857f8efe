"""`engine bench latency`: one batch; prefill time and decode step time against the roofline.

The memory roofline of a decode step is (weight bytes + K/V bytes read) / copy bandwidth,
with the bandwidth measured on the same device in the same run (bytes read + written).
Under tensor parallelism over N devices the roofline is that over N (each device reading
its share), which replicated KV heads and the all-reduces keep a sharded step from reaching.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine.sampling_params import SamplingParams


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def _prefill(eng, batch: int, input_len: int, max_tokens: int, rng) -> tuple[set, float]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    eng.scheduler.flush_cache()
    vocab = eng.vocab_size
    ids = {eng.add_request(rng.integers(10, vocab // 2, size=input_len).tolist(), sp)
           for _ in range(batch)}
    pending = set(ids)
    t0 = time.perf_counter()
    while pending:  # until every request has its first token
        pending -= {o.request_id for o in eng.step()}
    return ids, time.perf_counter() - t0


def measure(llm, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Prefill `batch` prompts of `input_len` tokens, then time `output_len` decode steps.
    A first untimed prefill (then aborted) and 3 untimed decode steps compile the shapes.
    The prefill time counts until every prompt has its first token."""
    eng = llm.engine
    cfg = llm.model_config
    rng = np.random.default_rng(seed)
    # The warm-up's requests must outlive their prefill like the timed ones, so that every
    # step mixes the same decodes and chunks (the same buckets) and nothing compiles later.
    for rid in _prefill(eng, batch, input_len, output_len + 5, rng)[0]:
        eng.abort(rid)
    ids, prefill = _prefill(eng, batch, input_len, output_len + 5, rng)
    for _ in range(3):
        eng.step()
    times = []
    for _ in range(output_len):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    for rid in ids:
        eng.abort(rid)
    step = statistics.median(times)
    kv_read = batch * (input_len + output_len // 2) * 2 * cfg.num_layers * cfg.num_kv_heads \
        * cfg.head_dim * jnp.dtype(eng.runner.kv[0][0].dtype).itemsize
    devices = len(eng.runner.kv[0][0].sharding.device_set)
    return {"batch": batch, "input_len": input_len, "prefill_s": prefill, "devices": devices,
            "decode_step_s": step, "decode_step_p90_s": sorted(times)[int(0.9 * len(times))],
            "kv_bytes_read": kv_read, "weight_bytes": param_bytes(eng.runner.params)}


HEADER = (f"{'batch':>6} {'ctx':>6} {'prefill ms':>11} {'prefill tok/s':>13} {'step ms':>9} "
          f"{'roofline ms':>12} {'x roofline':>10} {'tok/s':>9}")


def row_line(r: dict, bandwidth: float) -> str:
    # With N devices the ideal is each reading 1/N of the bytes at the same bandwidth.
    roof = (r["weight_bytes"] + r["kv_bytes_read"]) / (bandwidth * r.get("devices", 1))
    r["roofline_s"] = roof
    return (f"{r['batch']:>6} {r['input_len']:>6} {r['prefill_s'] * 1e3:>11.1f} "
            f"{r['batch'] * r['input_len'] / r['prefill_s']:>13.0f} "
            f"{r['decode_step_s'] * 1e3:>9.2f} {roof * 1e3:>12.2f} "
            f"{r['decode_step_s'] / roof:>10.2f} {r['batch'] / r['decode_step_s']:>9.1f}")
