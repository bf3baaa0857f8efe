"""Builders and a fake model runner for scheduler tests.

The fake runner plays the model through the page tables for real. The fake K/V of
position p is a hash of tokens [0, p] (like real K/V, it depends on the whole prefix);
it is written into a store keyed by (page_id, offset). Before computing from position
p, the runner checks that every earlier position of the request reads back the right
K/V through `page_ids`, and the sampled token is read from the K/V of the last
position, so a wrong page mapping fails a check or changes the outputs.

With `draft_rng`, the runner also speculates: each running decode gets up to 3 draft
tokens, each the fake model's next token with probability 0.6 (else a wrong one); the step
writes the drafts' K/V like any other token's, accepts the longest right run and hands the
rest back (Scheduler.accept_drafts), so a rolled-back position that is read again before it
is recomputed fails the K/V check.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from engine.core.request import Request, ScheduledBatch, Status
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.sampling_params import SamplingParams

VOCAB = 50

_DEFAULTS = dict(page_size=2, num_pages=64, max_running_requests=8, chunked_prefill_size=16,
                 schedule_policy="fcfs", disable_radix_cache=False, max_model_len=256)
_ids = itertools.count()


def make_config(**overrides: object) -> SchedulerConfig:
    return SchedulerConfig(**{**_DEFAULTS, **overrides})


def make_scheduler(**overrides: object) -> Scheduler:
    return Scheduler(make_config(**overrides))


def make_request(prompt: list[int], max_tokens: int = 4, rid: str | None = None,
                 group: str | None = None) -> Request:
    req = Request(rid or f"req-{next(_ids)}", list(prompt), SamplingParams(max_tokens=max_tokens),
                  seed=0, group=group)
    req.max_total_tokens = len(prompt) + max_tokens
    return req


def make_requests(prompts: list[list[int]], max_tokens: int = 4,
                  group: str | None = None) -> list[Request]:
    return [make_request(p, max_tokens, group=group) for p in prompts]


def prefix_hashes(tokens: list[int]) -> list[int]:
    """hashes[p] depends on tokens[0..p] only; stable across processes."""
    out, h = [], 0
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % (2**61 - 1)
        out.append(h)
    return out


def fake_next_token(tokens: list[int]) -> int:
    return prefix_hashes(tokens)[-1] % VOCAB


def expected_output(prompt: list[int], max_tokens: int, stop_token: int | None) -> list[int]:
    """What the fake model generates for `prompt` computed alone, straight through."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_next_token(tokens))
        if tokens[-1] == stop_token:
            break
    return tokens[len(prompt):]


class FakeRunner:
    def __init__(self, sched: Scheduler, stop_token: int | None = None,
                 draft_rng: random.Random | None = None) -> None:
        self.sched, self.draft_rng = sched, draft_rng
        self.stop_token = stop_token
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}  # (page, offset) -> (pos, K/V)
        self.outputs: dict[str, list[int]] = {}
        self.batches: list[ScheduledBatch] = []

    def add(self, *reqs: Request) -> None:
        for r in reqs:
            self.sched.add(r)

    def _propose(self) -> None:
        rng = self.draft_rng
        for r in self.sched.running:
            if r.num_tokens - r.num_computed_tokens == 1:
                tokens = list(r.all_token_ids)
                for _ in range(rng.randint(0, 3)):
                    right = fake_next_token(tokens)
                    tokens.append(right if rng.random() < 0.6 else (right + 1) % VOCAB)
                r.draft_token_ids = tokens[r.num_tokens:]

    def step(self) -> ScheduledBatch:
        if self.draft_rng is not None:
            self._propose()
        batch = self.sched.schedule()
        self.batches.append(batch)
        ps = self.sched.config.page_size
        assert len({s.request.request_id for s in batch.seqs}) == len(batch.seqs)
        assert batch.num_tokens <= self.sched.config.chunked_prefill_size
        assert batch.num_rows <= self.sched.config.max_running_requests
        for seq in batch.seqs:
            req, start = seq.request, seq.start_pos
            end = start + len(seq.token_ids)
            known = req.all_token_ids + seq.token_ids[len(seq.token_ids) - seq.num_draft:]
            assert req.num_computed_tokens == end
            assert req.status is Status.RUNNING
            assert seq.token_ids, "every scheduled request computes at least one token"
            assert seq.token_ids == known[start:end]
            assert len(seq.page_ids) * ps >= end, "pages must cover every computed position"
            assert seq.sample == (end == len(known))
            kv = prefix_hashes(known[:end])
            for q in range(start):
                slot = (seq.page_ids[q // ps], q % ps)
                assert self.kv.get(slot) == (q, kv[q]), f"{req.request_id} position {q}"
            for p in range(start, end):
                page = seq.page_ids[p // ps]
                assert self.sched.pool.refcount(page) == 1, f"write to shared page {page}"
                self.kv[(page, p % ps)] = (p, kv[p])
        for seq in batch.seqs:
            end = seq.start_pos + len(seq.token_ids)
            if seq.num_draft:
                self._verify(seq.request, seq.page_ids, end, seq.token_ids[-seq.num_draft:])
            elif seq.sample:
                self._sample(seq.request, seq.page_ids, end)
        return batch

    def _verify(self, req: Request, page_ids: list[int], end: int, drafts: list[int]) -> None:
        k = len(drafts)
        ps = self.sched.config.page_size
        targets = [self.kv[(page_ids[(p - 1) // ps], (p - 1) % ps)][1] % VOCAB
                   for p in range(end - k, end + 1)]
        n = 0
        while n < k and drafts[n] == targets[n]:
            n += 1
        self.sched.accept_drafts(req, k, n)
        assert len(req.page_ids) * ps < req.num_computed_tokens + 1 + ps, "pages not given back"
        for t in targets[:n + 1]:
            self._append(req, t)
            if req.finished:
                break

    def _sample(self, req: Request, page_ids: list[int], end: int) -> None:
        ps = self.sched.config.page_size
        self._append(req, self.kv[(page_ids[(end - 1) // ps], (end - 1) % ps)][1] % VOCAB)

    def _append(self, req: Request, token: int) -> None:
        req.output_token_ids.append(token)
        if token == self.stop_token:
            self.sched.finish(req, "stop")
        elif req.num_tokens >= req.max_total_tokens:
            self.sched.finish(req, "length")
        if req.finished:
            self.outputs[req.request_id] = list(req.output_token_ids)

    def run(self, max_steps: int = 5_000,
            check: list[Request] | None = None) -> dict[str, list[int]]:
        """Step until no work is left; with `check`, verify page accounting after each step."""
        for _ in range(max_steps):
            if not self.sched.has_work():
                return self.outputs
            self.step()
            if check is not None:
                check_pages(self.sched, check)
        raise AssertionError(f"still busy after {max_steps} steps")


def check_pages(sched: Scheduler, requests: list[Request]) -> None:
    """Page accounting from the outside: free + evictable + in use == total, and every
    refcount equals its holders (requests listing the page, plus one if cached)."""
    pool, cache = sched.pool, sched.cache
    live = [r for r in requests if not r.finished]
    for r in requests:
        if r.status is not Status.RUNNING:
            assert r.page_ids == [], f"{r.request_id} ({r.status}) holds pages"
    held = Counter(p for r in live for p in r.page_ids)
    cached = Counter(cache.cached_page_ids())
    assert all(c == 1 for c in cached.values()), "a page is cached twice"
    free = {p for p in range(pool.num_pages) if pool.refcount(p) == 0}
    evictable = set(cache.evictable_page_ids())
    in_use = set(held)
    assert len(free) == pool.num_free
    assert not free & (in_use | set(cached)), "a free page is still referenced"
    assert not evictable & in_use, "an evictable page is used by a request"
    assert set(cached) - evictable <= in_use, "a locked page is used by no request"
    assert len(evictable) == cache.evictable_pages
    for p in range(pool.num_pages):
        assert pool.refcount(p) == held[p] + cached[p], f"page {p}"
    assert pool.num_free + cache.evictable_pages + len(in_use) == pool.num_pages
