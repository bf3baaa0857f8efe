"""A burst of prompts arriving at once, under the CUDA preset's scheduler options.

The GPU run of 2026-12-03 (400 prompts of 1024 +-50% tokens in and 512 +-50% out, all at
once, an H200 pool of 851,392 tokens in pages of 16) had a TTFT p99 of 19 s: with 256
running requests, the last 144 prompts waited for the first ones to finish ~500 decode
steps later. The specification: every prompt of such a burst gets its first token within
the steps that prefilling all of them takes, each step fills its token budget while prompt
tokens wait, and every decode still gets its token in every step.
"""

from __future__ import annotations

import random

from engine.config import EngineConfig
from engine.core.request import ScheduledBatch, Status
from engine.core.scheduler import Scheduler, SchedulerConfig
from tests.core.helpers import FakeRunner, check_pages, expected_output, make_request

H200_POOL_TOKENS = 851_392
"""The KV pool `engine serve --backend cuda` made for the 8B shape on an H200 (2026-12-03)."""


def burst(n: int, rng: random.Random, prompt: int = 1024, output: int = 512) -> list:
    """n requests of [prompt / 2, prompt] tokens in and [output / 2, output] out (the
    lengths SGLang's bench_serving.py draws at range ratio 0.5)."""
    return [make_request([rng.randrange(1, 50_000) for _ in range(rng.randint(prompt // 2,
                                                                               prompt))],
                         max_tokens=rng.randint(output // 2, output), rid=f"r{i}")
            for i in range(n)]


def cuda_scheduler(num_pages: int) -> Scheduler:
    s = EngineConfig.build("cuda").scheduler
    return Scheduler(SchedulerConfig(
        page_size=16, num_pages=num_pages, max_running_requests=s.max_running_requests,
        chunked_prefill_size=s.chunked_prefill_size, schedule_policy=s.schedule_policy,
        max_model_len=8192))


def play(sched: Scheduler, batch: ScheduledBatch) -> None:
    """The engine's part after a step: a sampled row appends a token; the last one finishes."""
    for seq in batch.seqs:
        r = seq.request
        if seq.sample:
            r.output_token_ids.append(7)
            if r.num_tokens >= r.max_total_tokens:
                sched.finish(r, "length")


def test_a_burst_gets_every_first_token_within_the_prefill_steps() -> None:
    """400 prompts at once in the H200's pool: the last first token comes in the step that
    finishes the last prompt, and that step comes as soon as the budget allows (decode rows
    of finished prompts take some of each step's budget, at most one per request)."""
    sched = cuda_scheduler(H200_POOL_TOKENS // 16)
    reqs = burst(400, random.Random(0))
    for r in reqs:
        sched.add(r)
    budget = sched.config.chunked_prefill_size
    prompt_tokens = sum(r.num_prompt_tokens for r in reqs)
    bound = -(-prompt_tokens // (budget - len(reqs))) + 1
    steps = 0
    while any(not r.output_token_ids for r in reqs):
        ready = {r.request_id for r in sched.running if r.num_tokens - r.num_computed_tokens == 1}
        batch = sched.schedule()
        steps += 1
        assert steps <= bound, f"prompts still without a first token after {bound} steps"
        scheduled = {s.request.request_id for s in batch.seqs}
        assert ready <= scheduled, "a running decode got no token in a step"
        waiting = any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs)
        if waiting:  # prompt tokens left after this step: it used the whole budget
            assert batch.num_tokens == budget
        play(sched, batch)
    assert sched.stats().num_preemptions == 0


def test_the_cuda_preset_admits_a_400_prompt_burst_at_once() -> None:
    """Every request of the burst is running after the steps its prompts need."""
    sched = cuda_scheduler(H200_POOL_TOKENS // 16)
    reqs = burst(400, random.Random(1), prompt=64, output=8)
    for r in reqs:
        sched.add(r)
    play(sched, sched.schedule())  # 400 prompts of <= 64 tokens: 25k tokens, 4 steps
    for _ in range(3):
        play(sched, sched.schedule())
    assert all(r.status is not Status.WAITING for r in reqs)


def test_a_burst_larger_than_the_pool_finishes_with_the_outputs_of_each_alone() -> None:
    """Admission is bounded by pages, not by a running count: a burst whose full lengths
    exceed the pool fills it, preempts the newest when decodes need pages, and every
    request ends with what it computes alone; page accounting holds after every step."""
    rng = random.Random(2)
    sched = Scheduler(SchedulerConfig(page_size=4, num_pages=48, max_running_requests=32,
                                      chunked_prefill_size=64, max_model_len=128))
    runner = FakeRunner(sched)
    reqs = [make_request([rng.randrange(1, 50) for _ in range(rng.randint(8, 24))],
                         max_tokens=rng.randint(4, 16), rid=f"r{i}") for i in range(24)]
    runner.add(*reqs)
    outputs = runner.run(check=reqs)
    assert sched.stats().num_preemptions > 0  # the pool (192 tokens) held fewer than all
    for r in reqs:
        assert outputs[r.request_id] == expected_output(r.prompt_token_ids, r.params.max_tokens,
                                                        None)
    check_pages(sched, reqs)
