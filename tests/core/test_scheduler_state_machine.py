"""Random arrivals, steps, aborts, finishes and flushes; page accounting after every step.

Prompts come from a three-token alphabet so prefixes collide and the cache, sibling
groups, eviction and preemption all get exercised on small pools. Half the machines also
speculate (FakeRunner's draft tokens, some rejected), under the same invariants.
"""

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.core.request import Request, Status
from tests.core.helpers import (
    FakeRunner,
    check_pages,
    expected_output,
    make_request,
    make_scheduler,
)

MAX_MODEL_LEN = 24
STOP = 0


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 3, 4]), num_pages=st.integers(3, 20),
                max_running=st.integers(1, 4), extra_budget=st.integers(0, 10),
                policy=st.sampled_from(["fcfs", "lpm"]), eviction=st.sampled_from(["lru", "lfu"]),
                disable=st.sampled_from([False, False, False, True]),
                speculate=st.sampled_from([None, None, 0, 1]))
    def setup(self, page_size: int, num_pages: int, max_running: int, extra_budget: int,
              policy: str, eviction: str, disable: bool, speculate: int | None) -> None:
        self.sched = make_scheduler(
            page_size=page_size, num_pages=num_pages, max_running_requests=max_running,
            chunked_prefill_size=max_running + extra_budget, schedule_policy=policy,
            eviction_policy=eviction, disable_radix_cache=disable, max_model_len=MAX_MODEL_LEN)
        # speculate: the seed of the draft tokens' guesses (None: no speculation).
        self.runner = FakeRunner(self.sched, stop_token=STOP, draft_rng=None if speculate is None
                                 else random.Random(speculate))
        self.reqs: list[Request] = []
        self.cut_short: set[str] = set()  # finished by abort() or an early finish()

    def live(self) -> list[Request]:
        return [r for r in self.reqs if not r.finished]

    @rule(prompt=st.lists(st.integers(1, 3), min_size=1, max_size=14),
          max_tokens=st.integers(1, 8), n=st.integers(1, 3))
    def arrive(self, prompt: list[int], max_tokens: int, n: int) -> None:
        cfg = self.sched.config
        total = len(prompt) + max_tokens
        fits = -(-total // cfg.page_size) <= cfg.num_pages and total <= MAX_MODEL_LEN
        group = f"g{len(self.reqs)}" if n > 1 else None
        for _ in range(n):
            req = make_request(prompt, max_tokens, group=group)
            if fits:
                self.sched.add(req)
                self.reqs.append(req)
            else:
                with pytest.raises(ValueError, match=str(total)):
                    self.sched.add(req)

    @rule()
    def step(self) -> None:
        self.runner.step()
        assert self.sched.stats().num_running <= self.sched.config.max_running_requests

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.live()))
        assert self.sched.abort(req.request_id) is req
        assert (req.status, req.finish_reason, req.page_ids) == (Status.FINISHED, "abort", [])
        self.cut_short.add(req.request_id)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def finish_early(self, data: st.DataObject) -> None:
        """As when a stop string is found in the detokenized text."""
        req = data.draw(st.sampled_from(self.live()))
        self.sched.finish(req, "stop")
        assert req.finished and req.page_ids == [] and self.sched.get(req.request_id) is None
        self.cut_short.add(req.request_id)

    @rule()
    def flush(self) -> None:
        running = any(r.status is Status.RUNNING for r in self.reqs)
        assert self.sched.flush_cache() is (not running)
        if not running:
            assert self.sched.cache.cached_pages == 0

    @rule()
    def drain(self) -> None:
        self.runner.run(max_steps=1_000)
        assert all(r.finished for r in self.reqs)
        assert self.sched.flush_cache()
        assert self.sched.pool.num_free == self.sched.pool.num_pages

    @invariant()
    def pages_add_up(self) -> None:
        if hasattr(self, "sched"):
            check_pages(self.sched, self.reqs)

    @invariant()
    def outputs_match_a_solo_run(self) -> None:
        """Sharing, chunking and preemption never change what a request generates."""
        for r in getattr(self, "reqs", []):
            if r.finished and r.request_id not in self.cut_short:
                max_tokens = r.max_total_tokens - r.num_prompt_tokens
                assert r.output_token_ids == expected_output(r.prompt_token_ids, max_tokens, STOP)

    def teardown(self) -> None:
        if hasattr(self, "sched"):
            self.drain()


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
