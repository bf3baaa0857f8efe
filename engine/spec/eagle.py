"""EAGLE-3 proposer: a one-layer head drafts a chain of k tokens from the target's own
features (engine.spec.eagle_head), greedily.

Alignment: the head's row at position p reads the request's token p + 1 and the target's
features at position p (the inputs of three of its layers, kept by the target's step in
its hidden pool at the KV slot of p: ModelRunner.hidden). With L tokens known, the target
has computed positions [0, L - 1): the head catches up over them (rows without sampling,
chunked within a step's token budget), its row at L - 2 drafts token 1, and each further
draft j is a one-token row at L - 2 + j fed the head's own output of the row before.
By default the row at L - 2 and the chained rows are one jitted program with an on-device
loop (engine.spec.eagle_runner.EagleChain): one dispatch and one fetch a proposal; the
step-by-step path (k head steps, each read back before the next) is its reference. The
catch-up rows before them sample nothing and are not waited for.

The head's K/V of a request is valid for positions [0, computed): rows built from target
features. Chained rows are scratch, overwritten by the next catch-up once the target has
verified those positions. Features of prefix-cached positions are valid too: they were
written with the K/V of the same tokens. Pages are the head's own (no prefix cache); a
request's pages go back once it is not among the decodes to draft for, or when the pool
cannot hold its next drafts.
"""

from __future__ import annotations

from engine.core.page_pool import PagePool
from engine.core.request import Request, ScheduledBatch, ScheduledSeq
from engine.spec.draft import GREEDY, ShadowSeq
from engine.spec.eagle_runner import EagleChain


class EagleProposer:
    def __init__(self, runner, page_size: int, num_pages: int, vocab_size: int,
                 fused: bool = True, unroll: bool = False) -> None:
        """`runner`: an engine.spec.eagle_runner.EagleRunner with `num_pages` pages.
        `fused`: the k drafts as one program (EagleChain; `unroll`: its loop unrolled),
        else k head steps, each waited for."""
        self.runner, self.vocab_size, self.page_size = runner, vocab_size, page_size
        self._chain = EagleChain(runner, vocab_size, unroll) if fused else None
        self.pool = PagePool(num_pages, page_size)
        self._seqs: dict[str, ShadowSeq] = {}

    def _release(self, rid: str) -> None:
        self.pool.decref(self._seqs.pop(rid).page_ids)

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        live = {r.request_id for r in requests}
        for rid in [rid for rid in self._seqs if rid not in live]:
            self._release(rid)
        seqs = [self._seq(r, k) for r in requests]
        active = [i for i, s in enumerate(seqs) if s is not None]
        drafts: list[list[int]] = [[] for _ in requests]
        if not active:
            return drafts
        budget = self.runner.buckets.tokens[-1]
        while True:  # catch up to position L - 2 (exclusive), within a step's token budget
            rows, slots, left = [], [], budget
            for i in active:
                s, r = seqs[i], requests[i]
                n = min(r.num_tokens - 2 - s.computed, left)
                if n > 0:
                    rows.append(self._row(s, s.computed, n, sample=False))
                    slots += self._target_slots(r, s.computed, n)
                    s.computed += n
                    left -= n
            if not rows:
                break
            self.runner.draft(ScheduledBatch(rows), slots, chain=False)
        if self._chain is not None and k > 0:  # one dispatch: the row at L - 2, then chained
            rows = [self._row(seqs[i], requests[i].num_tokens - 2, 1, sample=True)
                    for i in active]
            slots = [self._target_slots(requests[i], requests[i].num_tokens - 2, 1)[0]
                     for i in active]
            for i, row in zip(active, self._chain(ScheduledBatch(rows), slots, k).tolist(),
                              strict=True):
                seqs[i].tokens += row
                seqs[i].computed = requests[i].num_tokens - 1  # chained rows are scratch
                drafts[i] = row
            return drafts
        for j in range(k):  # j = 0: the row at L - 2 (target features); then chained rows
            rows = [self._row(seqs[i], requests[i].num_tokens - 2 + j, 1, sample=True)
                    for i in active]
            slots = ([self._target_slots(requests[i], requests[i].num_tokens - 2, 1)[0]
                      for i in active] if j == 0 else [])
            tokens = self.runner.draft(ScheduledBatch(rows), slots, chain=j > 0)
            for i, token in zip(active, tokens, strict=True):
                token = token if 0 <= token < self.vocab_size else 0
                seqs[i].tokens.append(token)
                drafts[i].append(token)
            if j == 0:  # rows [0, L - 1) now hold target features; chained rows do not
                for i in active:
                    seqs[i].computed = requests[i].num_tokens - 1
        return drafts

    def _target_slots(self, r: Request, start: int, n: int) -> list[int]:
        ps = self.page_size
        return [r.page_ids[p // ps] * ps + p % ps for p in range(start, start + n)]

    def _seq(self, r: Request, k: int) -> ShadowSeq | None:
        """r's head state with pages for positions [0, L - 2 + k); None when r has no
        computed token yet, or the pool cannot hold it (then it drafts nothing this step)."""
        tokens = r.all_token_ids
        if len(tokens) < 2:
            return None
        s = self._seqs.get(r.request_id)
        if s is None:
            s = self._seqs[r.request_id] = ShadowSeq([], 0, [], Request(
                f"eagle:{r.request_id}", [], GREEDY, seed=0))
        same = 0  # the valid prefix: rows whose token (and so features) are unchanged
        for a, b in zip(s.tokens[:s.computed], tokens[1:], strict=False):
            if a != b:
                break
            same += 1
        # The head's token at position p is the request's token p + 1 (then its drafts).
        s.tokens, s.computed = tokens[1:], same
        need = -(-(len(tokens) - 2 + k) // self.page_size) - len(s.page_ids)
        if need > self.pool.num_free:
            self._release(r.request_id)
            return None
        s.page_ids += self.pool.alloc(max(need, 0))
        return s

    def _row(self, s: ShadowSeq, start: int, n: int, sample: bool) -> ScheduledSeq:
        s.shadow.prompt_token_ids = s.tokens
        return ScheduledSeq(s.shadow, s.tokens[start:start + n], start, list(s.page_ids),
                            sample=sample)
