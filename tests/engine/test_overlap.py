"""Overlap scheduling: step N+1 is launched before step N's tokens are read. Whatever the
batch holds, the outputs must equal the synchronous engine's, token for token."""

from __future__ import annotations

import re

import pytest

from engine import LLM, SamplingParams
from engine.runner import PLACEHOLDER

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fib(n):"]
SMALL = dict(backend="cpu", max_total_tokens=8192, max_running_requests=16,
             chunked_prefill_size=256)
"""The default_llm fixture's settings, so both engines compile the same programs."""


@pytest.fixture(scope="module")
def overlap_llm(default_gguf):
    return LLM(overlap_schedule=True, **SMALL)


def texts(outs) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


def same_outputs(a: LLM, b: LLM, prompts, params) -> list:
    outs_a, outs_b = a.generate(prompts, params), b.generate(prompts, params)
    assert texts(outs_b) == texts(outs_a)
    return outs_b


def test_greedy_mixed_lengths_and_stops(default_llm, overlap_llm):
    params = [SamplingParams(max_tokens=n, temperature=0, stop=stop, min_tokens=m)
              for n, stop, m in ((5, None, 0), (12, [" 6"], 0), (20, None, 4), (1, None, 0))]
    outs = same_outputs(default_llm, overlap_llm, PROMPTS, params)
    assert outs[1].outputs[0].finish_reason == "stop"  # the stop string ended it early
    assert overlap_llm.engine.scheduler.stats().kv_pages_used == 0  # every page came back


def test_seeded_sampling_n_and_logprobs(default_llm, overlap_llm):
    sp = SamplingParams(max_tokens=10, temperature=0.8, seed=3, n=2, logprobs=2)
    outs = same_outputs(default_llm, overlap_llm, PROMPTS[:2], sp)
    plain = default_llm.generate(PROMPTS[:2], sp)
    assert [o.outputs[1].logprobs for o in outs] == [o.outputs[1].logprobs for o in plain]


def test_penalties_and_constraints_run_synchronously_in_the_same_stream(default_llm,
                                                                          overlap_llm):
    """Rows whose sampling needs the previous token on the host (penalties, grammar masks)
    share the stream with overlapped rows."""
    params = [SamplingParams(max_tokens=8, temperature=0),
              SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_tokens=12, temperature=0, regex=r"[0-9]{3}-[0-9]{4}"),
              SamplingParams(max_tokens=8, temperature=0)]
    outs = same_outputs(default_llm, overlap_llm, PROMPTS, params)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[2].outputs[0].text)


def test_prefix_cache_holds_real_tokens(default_llm, overlap_llm):
    """Pages cached when a request finishes mid-flight hold its real tokens: a second
    request extending the first's output gets the same answer from both engines."""
    sp = SamplingParams(max_tokens=17, temperature=0)
    first = overlap_llm.generate(PROMPTS[2], sp)[0]
    follow = first.prompt_token_ids + first.outputs[0].token_ids
    again = same_outputs(default_llm, overlap_llm, [follow], sp)[0]
    assert again.num_cached_tokens > 0


def test_abort_while_in_flight(default_llm, overlap_llm):
    eng = overlap_llm.engine
    sp = SamplingParams(max_tokens=6, temperature=0)
    ids = [eng.add_request(overlap_llm.tokenizer.encode(p), sp) for p in PROMPTS]
    eng.step()
    eng.step()  # one step in flight
    eng.abort(ids[1])
    done = {}
    while eng.has_unfinished():
        done |= {o.request_id: o for o in eng.step() if o.finished}
    want = default_llm.generate([PROMPTS[i] for i in (0, 2, 3)], sp)
    assert [done[ids[i]].outputs[0].token_ids for i in (0, 2, 3)] == \
        [o.outputs[0].token_ids for o in want]
    eng.step()  # the aborted request's last launched step is read and dropped
    assert eng.scheduler.stats().kv_pages_used == 0
    assert all(PLACEHOLDER not in o.outputs[0].token_ids for o in done.values())


def test_preemption_under_a_tiny_pool(default_gguf):
    """Preempting a request whose token is still on the device: same outputs as the
    synchronous engine under the same pool."""
    kw = dict(backend="cpu", max_total_tokens=96, page_size=8, max_running_requests=4,
              chunked_prefill_size=64)
    plain, overlap = LLM(**kw), LLM(overlap_schedule=True, **kw)
    sp = SamplingParams(max_tokens=24, temperature=0)
    same_outputs(plain, overlap, PROMPTS, sp)
    assert overlap.engine.scheduler.stats().num_preemptions > 0
