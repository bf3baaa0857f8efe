"""The engine thread's CPU time per decode step at N running requests, without HTTP.

What the server's engine thread does each step (Engine.step with the overlap schedule, then
AsyncEngine._deliver building the deltas for the event loop), timed with the thread's own CPU
clock so XLA's pool threads and other processes do not count. The model is the tiny random
Llama of scripts/host_serving.py over the 8B shape's 49k-token tokenizer (needs .bench/).

    taskset -c 1 python scripts/engine_thread_step.py [--rows 400] [--gc-freeze]

--gc-freeze freezes the heap before the timed steps, as the server does at ready.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from host_serving import TINY_49K  # noqa: E402

from engine.heap import SERVING_THRESHOLDS, settle  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.server.async_engine import AsyncEngine  # noqa: E402
from engine.server.metrics import ServerMetrics  # noqa: E402
from engine.server.requests import RequestGroup  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400, help="running requests")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--gc-freeze", action="store_true")
    p.add_argument("--gc-threshold", type=int, nargs=3, default=None,
                   help="with --gc-freeze: the collector's thresholds (default: the server's)")
    p.add_argument("--tokenizer", type=Path, default=Path(".bench/llama-3.1-8b"))
    a = p.parse_args()
    model = Path(tempfile.mkdtemp(prefix="engine_thread_"))
    (model / "config.json").write_text(json.dumps(TINY_49K))
    for f in a.tokenizer.iterdir():
        if f.name != "config.json":
            shutil.copy(f, model)
    llm = LLM(str(model), backend="cpu", load_format="dummy", max_total_tokens=a.rows * 512,
              max_running_requests=max(512, a.rows), chunked_prefill_size=8192,
              overlap_schedule=True, disable_radix_cache=True)
    shutil.rmtree(model, ignore_errors=True)
    eng, loop = llm.engine, asyncio.new_event_loop()
    aeng = AsyncEngine(eng, loop, ServerMetrics())  # its thread never starts: we step here
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(a.rows):  # 64-token prompts: one step prefills them all
        ids = rng.integers(100, TINY_49K["vocab_size"] - 100, 64).tolist()
        aeng._on_add(RequestGroup(loop, f"r{i}", [ids], params, time.monotonic(),
                                  lambda *_: None))
    for _ in range(30):  # the prompts, then decode steps until every program is compiled
        aeng._deliver(eng.step())
    if a.gc_freeze:
        settle(tuple(a.gc_threshold) if a.gc_threshold else SERVING_THRESHOLDS)
    steps = []
    for _ in range(a.blocks * a.steps):
        t0 = time.thread_time()
        aeng._deliver(eng.step())
        steps.append((time.thread_time() - t0) * 1e3)
    blocks = [np.mean(b) for b in np.reshape(steps, (a.blocks, a.steps))]
    print(f"engine thread CPU ms per step at {a.rows} rows (gc freeze: {a.gc_freeze}, "
          f"thresholds {gc.get_threshold()}): "
          f"mean {np.mean(blocks):.2f}, best {min(blocks):.2f}, blocks "
          f"{' '.join(f'{b:.2f}' for b in blocks)}; a step's median {np.median(steps):.2f}, "
          f"p99 {np.percentile(steps, 99):.2f}, max {max(steps):.2f}")


if __name__ == "__main__":
    main()
