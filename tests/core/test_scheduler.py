"""Scheduler behaviour, spelled out with a fake model that reads K/V through page tables."""

import pytest

import engine.core.scheduler as scheduler_module
from engine.core.request import Status
from engine.core.scheduler import SchedulerConfig
from tests.core.helpers import (
    FakeRunner,
    check_pages,
    expected_output,
    make_config,
    make_request,
    make_requests,
    make_scheduler,
)

PREFIX = [7, 3, 9, 1, 4, 4, 8, 2]


def chunks(batch) -> list[tuple[str, int, int, bool]]:
    return [(s.request.request_id, s.start_pos, len(s.token_ids), s.sample) for s in batch.seqs]


def test_empty_scheduler_gives_an_empty_batch() -> None:
    sched = make_scheduler()
    assert not sched.schedule() and not sched.has_work()


def test_chunked_prefill_splits_a_prompt_under_the_budget() -> None:
    runner = FakeRunner(make_scheduler(page_size=4, chunked_prefill_size=4, max_running_requests=4))
    req = make_request(list(range(1, 11)), max_tokens=2, rid="a")
    runner.add(req)
    steps = [chunks(runner.step()) for _ in range(4)]
    assert steps == [[("a", 0, 4, False)], [("a", 4, 4, False)], [("a", 8, 2, True)],
                     [("a", 10, 1, True)]]
    assert req.finish_reason == "length" and len(req.output_token_ids) == 2
    assert not runner.sched.has_work()


def test_decodes_and_prompt_chunks_share_a_step() -> None:
    runner = FakeRunner(make_scheduler(chunked_prefill_size=8))
    a = make_request([1, 2, 3], max_tokens=5, rid="a")
    runner.add(a)
    assert chunks(runner.step()) == [("a", 0, 3, True)]
    runner.add(make_request(list(range(20)), rid="b"))
    # The decode takes one token of the budget; the new prompt gets the other seven.
    assert chunks(runner.step()) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert chunks(runner.step()) == [("a", 4, 1, True), ("b", 7, 7, False)]


@pytest.mark.parametrize("page_size", [1, 3, 4])
def test_a_shared_prefix_is_served_from_the_cache(page_size: int) -> None:
    def serve(disable: bool):
        sched = make_scheduler(page_size=page_size, disable_radix_cache=disable)
        runner = FakeRunner(sched)
        first = make_request(PREFIX + [50, 51])
        runner.add(first)
        runner.run(check=[first])
        computed_before = sched.stats().num_computed_tokens
        second = make_request(PREFIX + [60, 61, 62], max_tokens=3)
        runner.add(second)
        runner.run(check=[second])
        return second, sched.stats().num_computed_tokens - computed_before, sched

    hit, hit_computed, sched = serve(disable=False)
    miss, miss_computed, off = serve(disable=True)
    whole_pages = len(PREFIX) // page_size * page_size
    assert hit.num_cached_tokens == whole_pages > 0
    assert miss.num_cached_tokens == 0 and off.cache.cached_pages == 0
    assert hit_computed == miss_computed - whole_pages
    assert hit.output_token_ids == miss.output_token_ids  # shared K/V, same answer
    stats = sched.stats()
    assert stats.prefix_hit_tokens == whole_pages
    assert stats.prompt_tokens == len(PREFIX) * 2 + 5
    assert stats.prefix_hit_rate == pytest.approx(whole_pages / (len(PREFIX) * 2 + 5))


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_fully_cached_prompt_still_computes_its_last_token(page_size: int) -> None:
    runner = FakeRunner(make_scheduler(page_size=page_size))
    first, again = make_requests([PREFIX, PREFIX], max_tokens=2)
    runner.add(first)
    runner.run()
    runner.add(again)
    batch = runner.step()
    # One token must be computed so that there are logits to sample from.
    assert again.num_cached_tokens == (len(PREFIX) - 1) // page_size * page_size
    assert chunks(batch) == [(again.request_id, again.num_cached_tokens,
                              len(PREFIX) - again.num_cached_tokens, True)]
    runner.run(check=[first, again])
    assert again.output_token_ids == first.output_token_ids


def test_finished_outputs_are_cached_for_a_follow_up() -> None:
    page_size = 2
    runner = FakeRunner(make_scheduler(page_size=page_size))
    turn1 = make_request(PREFIX, max_tokens=6)
    runner.add(turn1)
    runner.run()
    turn2 = make_request(turn1.all_token_ids + [5], max_tokens=2)
    runner.add(turn2)
    runner.run(check=[turn1, turn2])
    # Every computed position of turn 1 (all but its last sampled token), in whole pages.
    assert turn2.num_cached_tokens == (len(PREFIX) + 6 - 1) // page_size * page_size


def test_a_newest_request_already_in_the_batch_can_still_be_retracted() -> None:
    """Tokens can arrive without being computed (e.g. forced by a grammar): an older
    request then needs a chunk, and retracting the newest undoes its place in the batch."""
    sched = make_scheduler(page_size=1, num_pages=12, chunked_prefill_size=8,
                           max_running_requests=2)
    runner = FakeRunner(sched)
    a = make_request([1, 2, 3, 4], max_tokens=8, rid="a")
    b = make_request([5, 6, 7, 8], max_tokens=2, rid="b")
    runner.add(a, b)
    runner.step()
    a.output_token_ids += [9, 9, 9]  # forced: a now needs 4 tokens, 4 more pages
    batch = runner.step()
    assert batch.preempted == [b] and chunks(batch) == [("a", 4, 4, True)]
    assert b.num_computed_tokens == 0
    # Only b's computed positions (its prompt) were cached, not the retracted decode.
    assert sched.cache.peek(b.all_token_ids) == 4
    runner.run(check=[a, b])
    assert b.output_token_ids == expected_output([5, 6, 7, 8], 2, None)


def test_identical_prompts_computed_together_end_up_on_one_copy() -> None:
    sched = make_scheduler(page_size=2, chunked_prefill_size=32)
    runner = FakeRunner(sched)
    reqs = make_requests([PREFIX, PREFIX], max_tokens=3)
    runner.add(*reqs)
    runner.step()  # both compute the prompt in the same step: no sharing possible yet
    runner.step()  # once computed, the second swaps to the first one's cached pages
    assert [r.num_cached_tokens for r in reqs] == [0, 0]
    assert reqs[0].page_ids[:4] == reqs[1].page_ids[:4]
    check_pages(sched, reqs)
    runner.run(check=reqs)


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_preemption_under_a_tiny_pool_gives_the_same_outputs(page_size: int) -> None:
    prompts = [PREFIX + [1, 2], PREFIX[:5] + [6, 6, 6], [9, 8, 7, 6, 5, 4], PREFIX + [3]]

    def serve(num_pages: int):
        sched = make_scheduler(page_size=page_size, num_pages=num_pages,
                               chunked_prefill_size=8, max_running_requests=4)
        reqs = make_requests(prompts, max_tokens=8)
        runner = FakeRunner(sched, stop_token=0)
        runner.add(*reqs)
        outputs = runner.run(check=reqs)
        return [outputs[r.request_id] for r in reqs], sched.stats(), runner.batches

    longest = max(len(p) for p in prompts) + 8
    ample, ample_stats, _ = serve(num_pages=64)
    tiny, tiny_stats, batches = serve(num_pages=-(-longest // page_size))
    assert ample_stats.num_preemptions == 0
    assert tiny_stats.num_preemptions > 0
    assert sum(len(b.preempted) for b in batches) == tiny_stats.num_preemptions
    assert tiny == ample


def test_preempting_the_newest_requeues_it_at_the_front() -> None:
    sched = make_scheduler(page_size=1, num_pages=10, max_running_requests=2)
    runner = FakeRunner(sched)
    a = make_request([1] * 4, max_tokens=4, rid="a")
    b = make_request([2] * 4, max_tokens=6, rid="b")
    c = make_request([3] * 4, max_tokens=6, rid="c")
    runner.add(a, b, c)
    runner.step()  # a and b: 4 pages each
    runner.step()  # both decode: the last 2 pages go
    batch = runner.step()  # a needs a page: b, the newest, is retracted
    assert batch.preempted == [b] and chunks(batch) == [("a", 5, 1, True)]
    assert (b.status, b.num_computed_tokens, b.page_ids, b.num_preemptions) == (
        Status.PREEMPTED, 0, [], 1)
    assert c.status is Status.WAITING  # nothing is admitted in a step that preempted
    runner.step()  # a's last token
    assert a.finish_reason == "length"
    batch = runner.step()
    assert batch.seqs[0].request is b  # b went back to the front, ahead of c
    assert b.num_cached_tokens > 0  # some of its computed pages were kept in the cache
    runner.run(check=[a, b, c])
    assert [len(r.output_token_ids) for r in (a, b, c)] == [4, 6, 6]


def abort_scenarios():
    """A runner, the request to abort in the named state, and everything added."""
    def queued():
        runner = FakeRunner(make_scheduler(max_running_requests=1))
        reqs = make_requests([[1, 2, 3], [4, 5, 6]])
        runner.add(*reqs)
        runner.step()
        return runner, reqs[1], reqs, Status.WAITING

    def mid_prefill():
        runner = FakeRunner(make_scheduler(chunked_prefill_size=4, max_running_requests=4))
        reqs = make_requests([list(range(10))])
        runner.add(*reqs)
        runner.step()
        assert reqs[0].num_computed_tokens < reqs[0].num_prompt_tokens
        return runner, reqs[0], reqs, Status.RUNNING

    def decoding():
        runner = FakeRunner(make_scheduler())
        reqs = make_requests([PREFIX], max_tokens=5)
        runner.add(*reqs)
        runner.step()
        runner.step()
        assert reqs[0].output_token_ids
        return runner, reqs[0], reqs, Status.RUNNING

    def preempted():
        runner = FakeRunner(make_scheduler(page_size=1, num_pages=10, max_running_requests=2))
        reqs = make_requests([[1] * 4, [2] * 4], max_tokens=6)
        runner.add(*reqs)
        for _ in range(3):
            runner.step()
        return runner, reqs[1], reqs, Status.PREEMPTED

    return {"queued": queued, "mid_prefill": mid_prefill, "decoding": decoding,
            "preempted": preempted}


@pytest.mark.parametrize("state", list(abort_scenarios()))
def test_abort_in_every_state_releases_everything(state: str) -> None:
    runner, victim, reqs, status = abort_scenarios()[state]()
    sched = runner.sched
    assert victim.status is status
    assert sched.abort(victim.request_id) is victim
    assert (victim.status, victim.finish_reason, victim.page_ids) == (Status.FINISHED, "abort", [])
    assert sched.get(victim.request_id) is None and sched.abort(victim.request_id) is None
    check_pages(sched, reqs)
    runner.run(check=reqs)
    assert all(r.finish_reason == "length" for r in reqs if r is not victim)
    assert sched.flush_cache() and sched.pool.num_free == sched.pool.num_pages


def test_a_request_that_can_never_fit_is_refused_with_the_numbers() -> None:
    sched = make_scheduler(page_size=4, num_pages=4, max_model_len=32)
    with pytest.raises(ValueError, match=r"20 tokens need 5 KV pages of 4 tokens.*only 4 pages"):
        sched.add(make_request(list(range(10)), max_tokens=10))
    with pytest.raises(ValueError, match=r"prompt 30 \+ max_tokens 5 = 35 tokens.*=32"):
        sched.add(make_request(list(range(30)), max_tokens=5))
    assert not sched.has_work()
    # Exactly the whole pool: accepted, and it runs alone to the end.
    runner = FakeRunner(sched)
    full = make_request(list(range(10)), max_tokens=6)
    runner.add(full)
    runner.run(check=[full])
    assert len(full.output_token_ids) == 6


def test_max_running_requests_is_respected() -> None:
    runner = FakeRunner(make_scheduler(max_running_requests=2, chunked_prefill_size=64))
    reqs = make_requests([[i, i + 1, i + 2] for i in range(6)], max_tokens=3)
    runner.add(*reqs)
    while runner.sched.has_work():
        batch = runner.step()
        assert len(batch.seqs) <= 2 and runner.sched.stats().num_running <= 2
        assert sum(r.status is Status.RUNNING for r in reqs) <= 2
    assert all(len(r.output_token_ids) == 3 for r in reqs)


@pytest.mark.parametrize("policy, first", [("fcfs", "other"), ("lpm", "sharer")])
def test_lpm_admits_the_longest_cached_prefix_first(policy: str, first: str) -> None:
    runner = FakeRunner(make_scheduler(schedule_policy=policy, max_running_requests=1))
    warm = make_request(PREFIX + [1])
    runner.add(warm)
    runner.run()
    runner.add(make_request([5, 5, 5, 5, 5], rid="other"))
    runner.add(make_request(PREFIX + [2, 2], rid="sharer"))
    assert [s.request.request_id for s in runner.step().seqs] == [first]


def test_lpm_falls_back_to_fcfs_on_a_long_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "LPM_MAX_WAITING", 1)
    runner = FakeRunner(make_scheduler(schedule_policy="lpm", max_running_requests=1))
    runner.add(make_request(PREFIX + [1]))
    runner.run()
    runner.add(make_request([5, 5, 5, 5, 5], rid="other"))
    runner.add(make_request(PREFIX + [2, 2], rid="sharer"))
    assert [s.request.request_id for s in runner.step().seqs] == ["other"]


def test_siblings_share_the_prompt_pages() -> None:
    sched = make_scheduler(page_size=2, chunked_prefill_size=32)
    runner = FakeRunner(sched)
    prompt = PREFIX + [5]  # 9 tokens: 4 whole pages
    leader, *siblings = reqs = make_requests([prompt] * 3, max_tokens=3, group="g")
    runner.add(*reqs)
    assert [s.request for s in runner.step().seqs] == [leader]  # siblings wait for it
    batch = runner.step()
    assert [s.request for s in batch.seqs] == reqs
    assert [r.num_cached_tokens for r in siblings] == [8, 8]
    assert all(r.page_ids[:4] == leader.page_ids[:4] for r in siblings)
    check_pages(sched, reqs)
    runner.run(check=reqs)
    # 9 prompt tokens for the leader, 1 for each sibling, then 2 decodes each.
    assert sched.stats().num_computed_tokens == 9 + 1 + 1 + 3 * 2
    assert leader.output_token_ids == siblings[0].output_token_ids == siblings[1].output_token_ids


def test_stats_count_steps_tokens_and_pages() -> None:
    sched = make_scheduler(page_size=2, num_pages=20, chunked_prefill_size=4,
                           max_running_requests=4)
    runner = FakeRunner(sched)
    req = make_request([1, 2, 3, 4, 5, 6], max_tokens=3)
    runner.add(req, make_request([9, 9], max_tokens=2))
    assert (sched.stats().num_waiting, sched.stats().num_running) == (2, 0)
    runner.step()  # 4 tokens of the first prompt
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_steps) == (1, 1, 1)
    assert (stats.kv_pages_used, stats.kv_pages_total) == (2, 20)
    assert stats.kv_usage == pytest.approx(0.1)
    runner.run()
    stats = sched.stats()
    assert stats.num_computed_tokens == (6 + 2) + (2 + 1)
    assert stats.kv_pages_used == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.prompt_tokens == 8


def test_flush_cache_only_when_idle() -> None:
    sched = make_scheduler(page_size=2)
    runner = FakeRunner(sched)
    req = make_request(PREFIX, max_tokens=4)
    runner.add(req)
    runner.step()
    assert not sched.flush_cache()
    runner.run()
    assert sched.cache.cached_pages > 0
    assert sched.flush_cache()
    assert sched.cache.cached_pages == 0 and sched.pool.num_free == sched.pool.num_pages


@pytest.mark.parametrize("overrides, message", [
    (dict(chunked_prefill_size=4, max_running_requests=8),
     "chunked_prefill_size=4 must be at least max_running_requests=8"),
    (dict(schedule_policy="sjf"), "'sjf'"),
    (dict(page_size=0), "page_size must be at least 1, got 0"),
    (dict(eviction_policy="mru"), "'mru'"),
])
def test_config_rejects_inconsistent_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SchedulerConfig().page_size = 8  # type: ignore[misc]
