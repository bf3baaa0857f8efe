"""Speculative decoding in the scheduler: where draft tokens go, and what a rejection gives
back (the random mix of it with everything else is in the state machine)."""

from engine.core.request import Status
from tests.core.helpers import check_pages, fake_next_token, make_request, make_scheduler


def running_decodes(sched, prompts, max_tokens=4):
    """Running requests "a", "b", ... whose prompts are computed and first tokens known."""
    reqs = [make_request(p, max_tokens, rid="abcd"[i]) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    sched.schedule()
    for r in reqs:
        r.output_token_ids.append(fake_next_token(r.prompt_token_ids))
    return reqs


def test_a_decode_with_drafts_is_one_row_and_rejected_pages_go_back() -> None:
    sched = make_scheduler(page_size=2, num_pages=8)
    (a,) = running_decodes(sched, [[1, 2, 3]], max_tokens=8)  # 3 of 4 tokens computed
    last = a.output_token_ids[0]
    a.draft_token_ids = [5, 6, 7]
    (seq,) = sched.schedule().seqs
    assert (seq.token_ids, seq.start_pos, seq.num_draft) == ([last, 5, 6, 7], 3, 3)
    assert a.num_computed_tokens == 7 and len(a.page_ids) == 4  # positions [0, 7)
    assert a.draft_token_ids == []  # consumed
    sched.accept_drafts(a, num_draft=3, num_accepted=1)
    # Verified: positions [0, 5); the next token (position 5) needs 3 pages, the 4th is free.
    assert a.num_computed_tokens == 5 and len(a.page_ids) == 3
    assert sched.pool.num_free == 8 - 3
    a.output_token_ids += [5, 9]  # the accepted draft and the target's token after it
    check_pages(sched, [a])
    stats = sched.stats()
    assert (stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_spec_verifies) == (3, 1, 1)
    assert stats.spec_tokens_per_verify == 2.0 and stats.spec_acceptance_rate == 1 / 3


def test_drafts_take_only_the_rows_the_decodes_leave() -> None:
    sched = make_scheduler(page_size=2, num_pages=12, chunked_prefill_size=8,
                           max_running_requests=3)
    a, b = running_decodes(sched, [[1, 2, 3], [4, 5, 6]])
    a.draft_token_ids, b.draft_token_ids = [7, 7, 7], [8, 8]
    batch = sched.schedule()
    # 3 rows: one per running decode, and one draft, which the older request gets.
    assert [s.num_draft for s in batch.seqs] == [1, 0] and batch.num_rows == 3


def test_drafts_never_take_the_page_another_decode_needs() -> None:
    sched = make_scheduler(page_size=1, num_pages=5, chunked_prefill_size=16)
    a, b = running_decodes(sched, [[1, 2], [3]], max_tokens=3)  # 2 + 1 pages held, 2 free
    a.draft_token_ids = [9, 9]
    seqs = {s.request.request_id: s for s in sched.schedule().seqs}
    # a's and b's next tokens take the 2 free pages: none is left for a draft, and no one
    # is preempted for one.
    assert seqs["a"].num_draft == 0 and "b" in seqs and b.status is Status.RUNNING
    assert sched.stats().num_preemptions == 0


def test_drafts_stop_at_max_tokens() -> None:
    sched = make_scheduler(page_size=1, num_pages=16)
    (a,) = running_decodes(sched, [[1, 2]], max_tokens=3)  # 3 of at most 5 tokens known
    a.draft_token_ids = [3, 3, 3, 3]
    (seq,) = sched.schedule().seqs
    assert seq.num_draft == 2
    sched.accept_drafts(a, 2, 2)
    a.output_token_ids += [3, 3]  # both accepted: the target's token after them is dropped
    assert a.num_tokens == a.max_total_tokens == a.num_computed_tokens == 5
    sched.finish(a, "length")
    check_pages(sched, [a])
    assert sched.cache.cached_pages == 5  # every position holds verified K/V


def test_no_drafts_while_a_prompt_chunk_runs() -> None:
    sched = make_scheduler(page_size=2, num_pages=32, chunked_prefill_size=6,
                           max_running_requests=4)
    (a,) = running_decodes(sched, [[1, 2, 3]])
    sched.add(make_request(list(range(1, 12)), rid="long"))
    sched.schedule()  # a decodes (its token is not appended: it stays a decode below)
    a.output_token_ids.append(0)
    a.draft_token_ids = [4, 4]
    batch = sched.schedule()
    assert {s.request.request_id: s.num_draft for s in batch.seqs} == {"a": 0, "long": 0}
