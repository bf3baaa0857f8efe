"""Draft-model proposer: a smaller model of the same tokenizer, with its own runner and its
own paged KV pool, proposes k tokens greedily, all requests batched together: rows that catch
up with each request's tokens (chunked within a step's token budget), then k one-token steps.
By default the tail of the catch-up and the k steps are one jitted program with an on-device
loop (engine.spec.draft_step): one dispatch and one fetch a proposal; the step-by-step path
(k runner steps, each read back before the next) is its reference.

Its K/V stays valid for the longest common prefix of what it computed and the request's
tokens now: after a verification, the accepted drafts are kept and everything past the
first rejected one is recomputed next time. Its pages are its own (no prefix cache); a
request's pages go back once it is not among the decodes to draft for (finished, aborted,
preempted or prefilling), or when the pool cannot hold its next drafts.
"""

from __future__ import annotations

import dataclasses

from engine.core.page_pool import PagePool
from engine.core.request import Request, ScheduledBatch, ScheduledSeq
from engine.sampling_params import SamplingParams
from engine.spec.draft_step import DraftProgram

GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass
class ShadowSeq:
    """A model proposer's state of one request (the draft model's, EAGLE-3's head's): K/V
    of tokens[:computed] in page_ids of its own pool."""

    tokens: list[int]
    computed: int
    page_ids: list[int]
    shadow: Request
    """What the proposer's runner samples for (greedy, its own id)."""


class DraftModelProposer:
    def __init__(self, runner, page_size: int, num_pages: int, vocab_size: int,
                 fused: bool = True, unroll: bool = False) -> None:
        """`runner`: an engine.runner.ModelRunner over the draft model with `num_pages`
        pages of `page_size` tokens. `fused`: the k proposals as one program
        (engine.spec.draft_step; `unroll`: its loop unrolled), else k steps of the runner,
        each waited for."""
        self.runner, self.vocab_size = runner, vocab_size
        self._program = DraftProgram(runner, vocab_size, unroll) if fused else None
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        self._seqs: dict[str, ShadowSeq] = {}

    def _release(self, rid: str) -> None:
        self.pool.decref(self._seqs.pop(rid).page_ids)

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        live = {r.request_id for r in requests}
        for rid in [rid for rid, s in self._seqs.items() if rid not in live]:
            self._release(rid)  # finished, aborted, or not decoding now: recomputed later
        seqs = [self._seq(r, k) for r in requests]
        budget = self.runner.buckets.tokens[-1]
        # The requests whose last tokens fit one step's budget together (a step of more
        # decodes than tokens is not one the runner has).
        active = [i for i, s in enumerate(seqs) if s is not None][:budget]
        # Catch up, in chunks within a step's budget, until what is left (each request's
        # uncomputed tokens, its last one included) fits one step: the fused program's first
        # forward takes that, the step-by-step path everything but the last token.
        keep = 1 if self._program is not None else 0
        while sum(len(seqs[i].tokens) - seqs[i].computed for i in active) > budget * keep:
            rows, left = [], budget
            for i in active:
                s = seqs[i]
                n = min(len(s.tokens) - 1 - s.computed, left)
                if n > 0:
                    rows.append(self._row(s, n, sample=False))
                    s.computed += n
                    left -= n
            if not rows:
                break
            self.runner.execute(ScheduledBatch(rows))
        drafts: list[list[int]] = [[] for _ in requests]
        if not active or k < 1:
            return drafts
        if self._program is not None:  # one dispatch: the rest of the catch-up, k drafts
            rows = [self._row(seqs[i], len(seqs[i].tokens) - seqs[i].computed, sample=True)
                    for i in active]
            for i, row in zip(active, self._program(ScheduledBatch(rows), k).tolist(),
                              strict=True):
                s = seqs[i]
                s.computed = len(s.tokens) + k - 1  # K/V of its tokens and drafts[:k - 1]
                s.tokens += row
                drafts[i] = row
            return drafts
        for _ in range(k):  # one token a row: the last known one, then each draft
            batch = ScheduledBatch([self._row(seqs[i], 1, sample=True) for i in active])
            for i, sample in zip(active, self.runner.execute(batch), strict=True):
                s = seqs[i]
                s.computed += 1
                token = sample.token if 0 <= sample.token < self.vocab_size else 0
                s.tokens.append(token)
                drafts[i].append(token)
        return drafts

    def _seq(self, r: Request, k: int) -> ShadowSeq | None:
        """r's draft state, with pages for its tokens and k - 1 drafts; None if the pool
        cannot hold them (the requests of this step keep theirs)."""
        tokens = r.all_token_ids
        s = self._seqs.get(r.request_id)
        if s is None:
            s = self._seqs[r.request_id] = ShadowSeq([], 0, [], Request(
                f"draft:{r.request_id}", [], GREEDY, seed=0))
        same = 0
        for a, b in zip(s.tokens[:s.computed], tokens, strict=False):
            if a != b:
                break
            same += 1
        # At most up to the last token, which a proposal's first forward takes as input: all
        # tokens match when a step took no drafts and decoded the first draft's token itself.
        s.tokens, s.computed = list(tokens), min(same, len(tokens) - 1)
        need = -(-(len(tokens) + k - 1) // self.page_size) - len(s.page_ids)
        if need > self.pool.num_free:  # no draft this step; its K/V is recomputed later
            self._release(r.request_id)
            return None
        s.page_ids += self.pool.alloc(max(need, 0))
        return s

    def _row(self, s: ShadowSeq, n: int, sample: bool) -> ScheduledSeq:
        # The runner samples for the shadow request (greedy: it reads only its output
        # length); the K/V positions come from start_pos.
        s.shadow.prompt_token_ids = s.tokens
        return ScheduledSeq(s.shadow, s.tokens[s.computed:s.computed + n], s.computed,
                            list(s.page_ids), sample=sample)
