"""`engine bench latency`: one batch; prefill time and decode step time against the roofline.

The memory roofline of a decode step is (weight bytes read + K/V bytes read) / copy
bandwidth, with the bandwidth measured on the same device in the same run (bytes read +
written). Weight bytes read: every weight but an untied embedding table, of which a step
gathers only its tokens' rows (engine.bench.roofline; until 2026-12-01 the whole table was
counted, 1.05 GB of the 8B shape's 16.06 GB, which flattered the ratio by ~7% at batch 1).
Under tensor parallelism over N devices the roofline is that over N (each device reading
its share), which replicated KV heads and the all-reduces keep a sharded step from reaching.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from engine.bench.roofline import ModelCost
from engine.sampling_params import SamplingParams


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
    kv = jax.tree.leaves(eng.runner.kv)[0]
    cost = ModelCost.of(cfg, eng.runner.params, kv.dtype.itemsize)
    return {"batch": batch, "input_len": input_len, "prefill_s": prefill,
            "devices": len(kv.sharding.device_set),
            "decode_step_s": step, "decode_step_p90_s": sorted(times)[int(0.9 * len(times))],
            "kv_bytes_read": batch * (input_len + output_len // 2) * cost.kv_bytes_per_token,
            "weight_bytes": cost.step_bytes(batch, 0)}


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
