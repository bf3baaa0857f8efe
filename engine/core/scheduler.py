"""Continuous-batching scheduler: which tokens each step computes, and in which pages.

Pure Python: no jax, nothing from backends/. There are no prefill and decode phases.
A request needs tokens [num_computed_tokens, num_tokens); a decode is a request that
needs one. Each step packs a token budget: first one token per running decode, then
chunks of running prompts (oldest first), then newly admitted requests in policy order.

Page ownership: a request holds one pool reference per entry of `page_ids`. Its first
`depth` pages are prefix-cache pages on the path it has locked (shared, read-only);
the rest are its own (refcount 1) and are the only pages it writes. Full pages join
the cache once computed (prompt pages while running, all of them at finish or
preemption), and the request then swaps to the cached copy and locks the longer path.

`schedule()` assumes the previous batch has been computed, and `finish()` is called
after the step that produced the final token; the engine finishes a request at the
latest when it reaches `max_total_tokens`.

Speculative decoding: a decode with draft tokens (`Request.draft_token_ids`) is scheduled
as a 1 + k token row, like a prompt chunk; num_computed_tokens then counts the drafts until
`accept_drafts()` rolls it back to the verified tokens and gives back the pages beyond
them. Drafts never displace real work: they use the budget and sequence rows the step's
decodes leave over and only pages that are free, and they never reach the prefix cache
(only computed pages of real tokens join it, and a request is rolled back before the
engine appends its verified tokens).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

from engine.core.page_pool import PagePool
from engine.core.radix_cache import EVICTION_POLICIES, Node, RadixCache
from engine.core.request import Request, ScheduledBatch, ScheduledSeq, Status

LPM_MAX_WAITING = 128
"""Above this many waiting requests "lpm" orders fcfs: matching them all costs too much."""


def _match_tokens(req: Request) -> list[int]:
    # One token is always left to compute, so the step produces logits to sample from. Prompt
    # logprobs from position s on need the logits of positions s - 1 on: computed, not cached.
    n = req.num_tokens - 1
    if req.params.prompt_logprobs is not None:
        n = min(n, max(req.params.prompt_logprobs_start - 1, 0))
    return req.all_token_ids[:n]


def _fcfs(waiting: list[Request], cache: RadixCache) -> list[Request]:
    return list(waiting)


def _lpm(waiting: list[Request], cache: RadixCache) -> list[Request]:
    if len(waiting) > LPM_MAX_WAITING:
        return list(waiting)
    return sorted(waiting, key=lambda r: -cache.peek(_match_tokens(r)))  # stable: fcfs ties


POLICIES: dict[str, Callable[[list[Request], RadixCache], list[Request]]] = {
    "fcfs": _fcfs,
    "lpm": _lpm,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    page_size: int = 16
    """Token slots per KV page."""
    num_pages: int = 1024
    """KV pages in the pool (the backend sizes it from free memory)."""
    max_running_requests: int = 256
    """Requests holding pages at once."""
    chunked_prefill_size: int = 8192
    """Token budget of one step: decode tokens and prompt chunks together."""
    schedule_policy: str = "fcfs"
    """Admission order of waiting requests: "fcfs" or "lpm" (longest prefix match)."""
    disable_radix_cache: bool = False
    """Share no pages between requests (the cache API stays, storing nothing)."""
    max_model_len: int = 8192
    """Prompt + output tokens one request may reach."""
    eviction_policy: str = "lru"
    """Which unlocked cache leaves go first: "lru" or "lfu"."""

    def __post_init__(self) -> None:
        for name in ("page_size", "num_pages", "max_running_requests",
                     "chunked_prefill_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule_policy not in POLICIES:
            raise ValueError(f"schedule_policy must be one of {sorted(POLICIES)}, "
                             f"got {self.schedule_policy!r}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy must be one of {sorted(EVICTION_POLICIES)}, "
                             f"got {self.eviction_policy!r}")
        if self.chunked_prefill_size < self.max_running_requests:
            # Otherwise some running decode gets no token in a step and may starve.
            raise ValueError(f"chunked_prefill_size={self.chunked_prefill_size} must be at least "
                             f"max_running_requests={self.max_running_requests}")


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_pages_used: int
    """Pages held by requests (cache pages they lock included)."""
    kv_pages_cached: int
    """Pages in the prefix cache, locked or not."""
    kv_pages_total: int
    prefix_hit_tokens: int
    prompt_tokens: int
    """Tokens looked up in the cache at admissions (re-admissions after preemption count)."""
    num_preemptions: int
    num_computed_tokens: int
    num_steps: int
    num_draft_tokens: int = 0
    """Speculative decoding: draft tokens verified by the target model."""
    num_accepted_tokens: int = 0
    """Draft tokens the target model accepted."""
    num_spec_verifies: int = 0
    """Decode rows that verified drafts; each yields its accepted drafts + 1 tokens."""

    @property
    def spec_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def spec_tokens_per_verify(self) -> float:
        """Tokens a speculative decode row yields per step (accepted drafts + 1)."""
        n = self.num_spec_verifies
        return (self.num_accepted_tokens + n) / n if n else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclasses.dataclass
class _Slot:
    """A running request's hold on the cache: `node` is locked, and the path to it
    holds exactly page_ids[:depth]."""

    node: Node
    depth: int


@dataclasses.dataclass
class _Step:
    seqs: dict[str, ScheduledSeq]
    budget: int
    drafts: int = 0
    """Draft tokens scheduled: each takes a row of the step's sequence bucket."""
    preempted: list[Request] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool | None = None,
                 cache: RadixCache | None = None) -> None:
        self.config = config
        self.pool = pool or PagePool(config.num_pages, config.page_size)
        self.cache = cache or RadixCache(self.pool, config.eviction_policy,
                                         disabled=config.disable_radix_cache)
        self._policy = POLICIES[config.schedule_policy]
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the last is the newest
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._slots: dict[str, _Slot] = {}  # running requests only
        self._hits = self._looked_up = self._preemptions = self._computed = self._steps = 0
        self._drafted = self._accepted = self._verifies = 0

    def add(self, req: Request) -> None:
        """Queue `req`; ValueError if it could never run, even alone in the pool."""
        rid, n, total = req.request_id, req.num_prompt_tokens, req.max_total_tokens
        ps, num_pages = self.config.page_size, self.config.num_pages
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already scheduled")
        if n == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if total <= n:
            raise ValueError(f"request {rid!r}: max_total_tokens={total} must exceed the "
                             f"prompt length {n} (prompt + max_tokens)")
        if total > self.config.max_model_len:
            raise ValueError(f"request {rid!r}: prompt {n} + max_tokens {total - n} = {total} "
                             f"tokens exceeds max_model_len={self.config.max_model_len}")
        if -(-total // ps) > num_pages:
            raise ValueError(f"request {rid!r}: {total} tokens need {-(-total // ps)} KV pages "
                             f"of {ps} tokens, but the pool has only {num_pages} pages")
        req.status = Status.WAITING
        self._waiting.append(req)
        self._requests[rid] = req

    def schedule(self) -> ScheduledBatch:
        """The next step's batch. Advances num_computed_tokens of every scheduled request."""
        step = _Step({}, self.config.chunked_prefill_size)
        decodes: list[Request] = []
        others: list[Request] = []
        for r in self._running:
            self._share_computed(r, min(r.num_computed_tokens, r.num_prompt_tokens))
            left = r.num_tokens - r.num_computed_tokens
            if left == 1:
                decodes.append(r)
            elif left > 1:
                others.append(r)
        # Budget and rows the decodes leave for drafts (each decode keeps its 1 token), and
        # the pages their next tokens need. No drafts while prompt chunks run: they must not
        # take the pages a chunk would then preempt a request for.
        spare = 0 if others else min(step.budget - len(decodes),
                                     self.config.max_running_requests - len(self._running))
        if not any(r.draft_token_ids for r in decodes):
            spare = 0  # no drafts to place: skip the page reservations that place them
        need = {r.request_id: max(self._pages_for(r.num_computed_tokens + 1) - len(r.page_ids), 0)
                for r in decodes} if spare else {}
        reserved = sum(need.values())
        for r in decodes + others:
            n = min(r.num_tokens - r.num_computed_tokens, step.budget)
            drafts = r.draft_token_ids
            if drafts:
                r.draft_token_ids = []
            k = self._draft_room(r, min(len(drafts), spare), reserved) if spare else 0
            if spare:
                reserved -= need.get(r.request_id, 0)
            if r.status is Status.RUNNING and n > 0 and self._grow(r, n + k, step):
                self._add_seq(r, n, step, drafts[:k])
                spare -= k
        if not step.preempted:  # pages just ran short: admitting more would thrash
            self._admit(step)
        batch = ScheduledBatch(list(step.seqs.values()), step.preempted)
        self._computed += batch.num_tokens
        self._steps += bool(batch)
        return batch

    def _grow(self, r: Request, n: int, step: _Step) -> bool:
        """Pages for `n` more tokens of running `r`: evict, then preempt the newest.

        False when `r` itself was preempted. `r` alone always fits (add() checks it),
        so the oldest running request always makes progress.
        """
        need = self._pages_for(r.num_computed_tokens + n) - len(r.page_ids)
        if need <= 0:  # most decodes: the token fits the last page
            return True
        while need > self.pool.num_free:
            if self.cache.evictable_pages:
                self.cache.evict(need - self.pool.num_free)
                continue
            victim = self._running[-1]
            self._preempt(victim, step)
            if victim is r:
                return False
        r.page_ids += self.pool.alloc(need)
        return True

    def _admit(self, step: _Step) -> None:
        if not self._waiting:
            return
        # Per sibling group, the fewest pages any running sibling has cached so far.
        group_cached: dict[str, int] = {}

        def note(r: Request) -> None:
            if r.group is not None:
                depth = self._slots[r.request_id].depth
                group_cached[r.group] = min(depth, group_cached.get(r.group, depth))

        for r in self._running:
            note(r)
        admitted: set[Request] = set()
        for r in self._policy(list(self._waiting), self.cache):
            if (len(self._running) + step.drafts >= self.config.max_running_requests
                    or step.budget <= 0):
                break
            if self._held_back(r, group_cached):
                continue
            if not self._admit_one(r, step):
                break  # out of pages: later arrivals must not overtake it
            admitted.add(r)
            note(r)
        if admitted:
            self._waiting = deque(r for r in self._waiting if r not in admitted)

    def _held_back(self, r: Request, group_cached: dict[str, int]) -> bool:
        """A sibling waits while a running sibling still computes the prompt pages it could
        share, so that it shares them instead of computing a copy."""
        if self.cache.disabled or r.group not in group_cached:
            return False
        shareable = min(r.num_tokens - 1, r.num_prompt_tokens) // self.config.page_size
        return group_cached[r.group] < shareable

    def _admit_one(self, r: Request, step: _Step) -> bool:
        pages, node = self.cache.match(_match_tokens(r))
        self.pool.incref(pages)
        self.cache.lock(node)  # before evicting, so the match itself survives
        self._slots[r.request_id] = _Slot(node, len(pages))
        r.page_ids = list(pages)
        r.num_computed_tokens = r.num_cached_tokens = len(pages) * self.config.page_size
        n = min(r.num_tokens - r.num_computed_tokens, step.budget)
        need = self._pages_for(r.num_computed_tokens + n) - len(pages)
        if need > self.pool.num_free:
            self.cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            self._release(r)
            r.num_computed_tokens = r.num_cached_tokens = 0
            return False
        r.page_ids += self.pool.alloc(need)
        r.status = Status.RUNNING
        self._running.append(r)
        self._hits += r.num_cached_tokens
        self._looked_up += r.num_tokens
        self._add_seq(r, n, step)
        return True

    def _draft_room(self, r: Request, k: int, reserved: int) -> int:
        """How many of k drafts decode `r` may carry: within max_total_tokens, and in pages
        that are free now beyond the `reserved` ones the step's unscheduled decodes (r
        included) need for their next tokens."""
        c, held = r.num_computed_tokens, len(r.page_ids)
        k = max(min(k, r.max_total_tokens - r.num_tokens), 0)
        free = self.pool.num_free - reserved
        while k and self._pages_for(c + 1 + k) - max(self._pages_for(c + 1), held) > free:
            k -= 1
        return k

    def _add_seq(self, r: Request, n: int, step: _Step, drafts: list[int] = ()) -> None:
        start = r.num_computed_tokens
        end = start + n
        p = r.num_prompt_tokens
        if end <= p:
            tokens = r.prompt_token_ids[start:end]
        elif start >= p:  # decodes
            tokens = r.output_token_ids[start - p : end - p]
        else:
            tokens = r.prompt_token_ids[start:] + r.output_token_ids[: end - p]
        if drafts:
            tokens += drafts
        step.seqs[r.request_id] = ScheduledSeq(r, tokens, start,
                                               list(r.page_ids), sample=end == r.num_tokens,
                                               num_draft=len(drafts))
        r.num_computed_tokens = end + len(drafts)
        step.budget -= n + len(drafts)
        step.drafts += len(drafts)

    def accept_drafts(self, r: Request, num_draft: int, num_accepted: int) -> None:
        """After the step that verified `num_draft` drafts of running decode `r`, of which
        the first `num_accepted` were accepted, and before the engine appends its tokens:
        positions past the accepted drafts hold rejected K/V (num_computed_tokens rolls back
        over them) and the pages past the one its next token needs go back to the pool."""
        if not 0 <= num_accepted <= num_draft:
            raise ValueError(f"{num_accepted=} must be in [0, {num_draft=}]")
        r.num_computed_tokens -= num_draft - num_accepted
        if r.num_computed_tokens != r.num_tokens + num_accepted:
            raise ValueError(f"request {r.request_id!r}: accept_drafts after its tokens were "
                             f"appended ({r.num_computed_tokens=}, {r.num_tokens=})")
        keep = max(self._pages_for(r.num_computed_tokens + 1), self._slots[r.request_id].depth)
        self.pool.decref(r.page_ids[keep:])  # own pages (refcount 1): drafts only
        del r.page_ids[keep:]
        self._drafted += num_draft
        self._accepted += num_accepted
        self._verifies += 1

    def _preempt(self, r: Request, step: _Step) -> None:
        """Retract `r`: its computed full pages stay cached, it is recomputed later."""
        seq = step.seqs.pop(r.request_id, None)
        if seq is not None:  # scheduled earlier in this step: undo that
            r.num_computed_tokens = seq.start_pos
            step.budget += len(seq.token_ids)
            step.drafts -= seq.num_draft
        self._leave_running(r, keep=True)
        r.num_computed_tokens = 0
        r.status = Status.PREEMPTED
        r.num_preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(r)
        step.preempted.append(r)

    def _share_computed(self, r: Request, upto: int) -> None:
        """Cache r's full pages within positions [0, upto), then use and lock the cached copy."""
        slot = self._slots[r.request_id]
        full = upto // self.config.page_size
        if full <= slot.depth or self.cache.disabled:
            return
        tokens = r.all_token_ids[: full * self.config.page_size]
        self.cache.insert(tokens, r.page_ids[:full])
        pages, node = self.cache.match(tokens)
        for i, p in enumerate(pages):
            if r.page_ids[i] != p:  # a duplicate of what another request cached first
                self.pool.incref([p])
                self.pool.decref([r.page_ids[i]])
                r.page_ids[i] = p
        self.cache.lock(node)
        self.cache.unlock(slot.node)
        slot.node, slot.depth = node, len(pages)

    def _leave_running(self, r: Request, keep: bool) -> None:
        """Drop r from running; with `keep`, its computed full pages join the cache first."""
        full = r.num_computed_tokens // self.config.page_size
        if keep and full:
            self.cache.insert(r.all_token_ids[: full * self.config.page_size], r.page_ids[:full])
        self._release(r)
        self._running.remove(r)

    def _release(self, r: Request) -> None:
        self.cache.unlock(self._slots.pop(r.request_id).node)
        self.pool.decref(r.page_ids)
        r.page_ids = []

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def finish(self, req: Request, reason: str) -> None:
        """End `req` in any state; pages it computed stay in the cache when it ran."""
        self._end(req, reason, keep=True)

    def abort(self, request_id: str) -> Request | None:
        """End the request in any state, caching nothing new; None if it is unknown."""
        req = self._requests.get(request_id)
        if req is not None:
            # Its last batch may not have run: the newest pages may hold no K/V yet.
            self._end(req, "abort", keep=False)
        return req

    def _end(self, req: Request, reason: str, keep: bool) -> None:
        if self._requests.pop(req.request_id, None) is None:
            raise ValueError(f"request {req.request_id!r} is not scheduled")
        # With overlap scheduling a step may already compute past the final token (the
        # engine drops that step's placeholder): only real tokens' pages may be cached.
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
        if req.request_id in self._slots:
            self._leave_running(req, keep)
        else:
            self._waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    @property
    def running(self) -> tuple[Request, ...]:
        """Running requests, oldest admission first."""
        return tuple(self._running)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, request_id: str) -> Request | None:
        """An unfinished request by id."""
        return self._requests.get(request_id)

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while any request is running."""
        if self._running:
            return False
        self.cache.flush()
        return True

    def stats(self) -> SchedulerStats:
        total = self.pool.num_pages
        return SchedulerStats(
            num_running=len(self._running), num_waiting=len(self._waiting),
            kv_pages_used=total - self.pool.num_free - self.cache.evictable_pages,
            kv_pages_cached=self.cache.cached_pages, kv_pages_total=total,
            prefix_hit_tokens=self._hits, prompt_tokens=self._looked_up,
            num_preemptions=self._preemptions, num_computed_tokens=self._computed,
            num_steps=self._steps, num_draft_tokens=self._drafted,
            num_accepted_tokens=self._accepted, num_spec_verifies=self._verifies)
