"""CPU time of an EAGLE-3 proposal (EagleProposer.propose), the fused k-draft program
against the step-by-step reference, on the tiny target and random head of
tests/engine/test_spec_eagle.py: one request decoding (batch 1), k drafts a step, the
target accepting 0..k of them in turn. The two proposers alternate step by step in one
process; each call is timed with the process's CPU clock (XLA's threads included).

    taskset -c 1 python scripts/eagle_propose.py [--steps 400] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
from engine import LLM, SamplingParams  # noqa: E402
from engine.core.request import Request  # noqa: E402
from engine.spec.eagle import EagleProposer  # noqa: E402
from engine.spec.eagle_runner import EagleRunner  # noqa: E402
from tests.engine.test_spec_eagle import HEAD, OPTS, TARGET, V  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "t.json").write_text(json.dumps(TARGET))
    (tmp / "head").mkdir()
    (tmp / "head" / "config.json").write_text(json.dumps(HEAD))
    llm = LLM(str(tmp / "t.json"), speculative_algorithm="eagle",
              speculative_draft_model=str(tmp / "head"), **{**OPTS, "load_format": "dummy"})
    r = llm.engine.proposer.runner
    target = r.target
    rng = np.random.default_rng(0)
    target.hidden = jax.device_put(
        rng.standard_normal(target.hidden.shape).astype(target.hidden.dtype),
        target.hidden.sharding)
    proposers = {}
    for name, fused in (("fused", True), ("steps", False)):
        runner = EagleRunner(r.ec, r.params, target, r.backend, num_pages=r.num_pages,
                             max_model_len=1024, buckets=r.buckets)
        proposers[name] = EagleProposer(runner, r.page_size, r.num_pages, V, fused=fused)
    pages = list(range(-(-256 // target.page_size)))
    prompt = rng.integers(1, V, size=40).tolist()
    reqs: dict[str, Request] = {}
    times: dict[str, list[float]] = {n: [] for n in proposers}
    for step in range(a.steps + 120):  # the first 120 (a whole request): compilation
        for name, p in proposers.items():
            req = reqs.get(name)
            if req is None or req.num_tokens > 200:  # a new request (a catch-up from 0)
                req = reqs[name] = Request(f"{name}{step}", prompt, SamplingParams(), seed=0)
                req.output_token_ids.append(1)
                req.page_ids = pages
            t0 = time.process_time()
            d = p.propose([req], a.k)[0]
            dt = time.process_time() - t0
            if step >= 120:
                times[name].append(dt)
            n = step % (a.k + 1)
            req.output_token_ids += d[:n] + [int(rng.integers(1, V))]
    for name, t in times.items():
        t = np.asarray(t) * 1e3
        print(f"{name}: propose CPU ms best {t.min():.3f} median {np.median(t):.3f} "
              f"mean {t.mean():.3f} over {len(t)}")


if __name__ == "__main__":
    main()
