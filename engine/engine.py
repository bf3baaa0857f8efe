"""The engine step loop: receive -> schedule -> run -> process outputs.

Works on token ids; stop strings need text, so each request's incremental detokenizer
lives here too. The scheduler decides everything about pages; the runner computes.
Structured outputs: each sequence (each of n siblings) owns a grammar matcher, held here by
request id, so it survives preemption (which recomputes K/V but never resamples) and is
untouched by prefix caching; it advances exactly with the tokens appended to the output.

Speculative decoding (a proposer): before scheduling, running decodes get draft tokens; the
step verifies them and `_process` appends the accepted run one token at a time through
`_append`, so every stop rule applies and tokens after a stop are dropped. Speculative steps
run synchronously (an overlapped step in flight is collected first): the proposer needs the
previous step's tokens on the host. Rows with a grammar or prompt logprobs get no drafts.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from typing import Any

from engine.core.request import Request, ScheduledBatch
from engine.core.scheduler import Scheduler
from engine.detokenizer import IncrementalDetokenizer
from engine.memory import MemoryReleasedError
from engine.outputs import CompletionOutput, RequestOutput
from engine.runner import PLACEHOLDER, GrammarMasks, Launched, ModelRunner, TokenSample
from engine.sampling_params import SamplingParams
from engine.spec import Proposer
from engine.spec.accept import num_accepted
from engine.spec.governor import SpecGovernor, StepTally
from engine.structured import DEFAULT_BACKEND, GrammarCompiler, Matcher, make_backend

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Group:
    """One user request: its n sibling sequences and the output being built."""

    output: RequestOutput
    children: list[Request]
    detoks: list[IncrementalDetokenizer | None]


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Any,
                 *, eos_token_ids: tuple[int, ...], vocab_size: int, max_model_len: int,
                 seed: int = 0, grammar_backend: str = DEFAULT_BACKEND,
                 overlap: bool = False, proposer: Proposer | None = None,
                 num_draft_tokens: int = 4, spec_max_batch: int | None = None,
                 spec_adaptive: bool = False) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self._groups: dict[str, _Group] = {}
        self._owner: dict[str, tuple[str, int]] = {}  # child id -> (user request id, index)
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self.grammar_backend = grammar_backend
        self._grammars: GrammarCompiler | None = None  # made on the first constraint
        self._matchers: dict[str, Matcher] = {}  # child request id -> its grammar state
        # One-token decodes of the tokenizer, by skip_special_tokens (IncrementalDetokenizer).
        self._token_texts: dict[bool, dict[int, str]] = {True: {}, False: {}}
        self.overlap = overlap
        # The launched step whose tokens are unread, and where each request's PLACEHOLDER
        # for its token sits in output_token_ids (overlap scheduling).
        self._inflight: tuple[Launched, dict[str, int]] | None = None
        self.weight_recipe: Any = None
        """engine.weights_update.WeightRecipe: what start-up did to the loaded weights."""
        self.startup: Any = None
        """engine.startup.StartupPhases: seconds of each start-up phase (the builder's)."""
        self.weight_version = "0"
        """Which weights produce samples: "0" as loaded, then the count of updates or the
        version string an update named (engine.weights_update.swap)."""
        self.weight_updates = 0
        self.memory_released: set[str] = set()
        """engine.memory tags whose device memory is released: no request is taken."""
        self.proposer, self.num_draft_tokens = proposer, num_draft_tokens
        self.spec_max_batch = spec_max_batch
        """Speculate only while at most this many requests run (None: always)."""
        self.governor = SpecGovernor() if proposer is not None and spec_adaptive else None
        """Speculate only while it measures faster (engine.spec.governor); None: always."""
        self._tally: StepTally | None = None  # what a governed step yields (else None)

    # -- receive -------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, prompt: str | None = None) -> str:
        """Validate and queue. Raises ValueError with a user-actionable message."""
        if self.memory_released:
            what = ", ".join(sorted(self.memory_released))
            raise MemoryReleasedError(f"the engine's memory is released ({what}): take it back "
                                      "first (POST /resume_memory_occupation)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        max_tokens = params.max_tokens or self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len or max_tokens < 1:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")
        spec = params.grammar
        # Compiled here, so that a bad constraint is the caller's ValueError, never a failure
        # inside the step loop.
        compiled = self.grammar_compiler().compile(spec) if spec is not None else None
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        children = [
            Request(request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                    prompt_token_ids=list(prompt_token_ids), params=params,
                    seed=(base_seed + i) % 2**63, arrival=time.monotonic(),
                    max_total_tokens=n_prompt + max_tokens,
                    group=request_id if params.n > 1 else None)
            for i in range(params.n)
        ]
        detoks = [self._detokenizer(prompt_token_ids, params) for _ in children]
        out = RequestOutput(request_id, prompt, list(prompt_token_ids),
                            [CompletionOutput(i) for i in range(params.n)])
        for i, child in enumerate(children):  # siblings are the same size: one fits, all do
            self.scheduler.add(child)
            self._owner[child.request_id] = (request_id, i)
            if compiled is not None:
                self._matchers[child.request_id] = compiled.matcher()
        self._groups[request_id] = _Group(out, children, detoks)
        return request_id

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of constraints (the grammar library is loaded on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer, and this "
                                 "model has none")
            backend = make_backend(self.grammar_backend, self.tokenizer, self.vocab_size,
                                   sorted(self.eos_token_ids))
            self._grammars = GrammarCompiler(backend)
        return self._grammars

    def _detokenizer(self, prompt_ids: list[int], p: SamplingParams):
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=p.skip_special_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output,
            min_tokens=p.min_tokens, token_texts=self._token_texts[p.skip_special_tokens])

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for child, comp in zip(group.children, group.output.outputs, strict=True):
            self._owner.pop(child.request_id, None)
            self._matchers.pop(child.request_id, None)
            if self.scheduler.abort(child.request_id) is not None or comp.finish_reason is None:
                comp.finish_reason = comp.finish_reason or "abort"
        return group.output

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of user requests that made progress."""
        gov, may = self.governor, self._may_speculate()
        if gov is None or not may:
            return self._step(may)
        spec = gov.decide()
        self._tally = tally = StepTally()
        t0 = time.perf_counter()
        outs = self._step(spec)
        self._tally = None
        gov.observe(spec, time.perf_counter() - t0, tally.tokens_per_row())
        return outs

    def _step(self, speculate: bool) -> list[RequestOutput]:
        if speculate:
            if self._inflight is not None:  # collect the overlapped step: drafts need its tokens
                prev, self._inflight = self._inflight, None
                return self._process(prev[0].batch, self.runner.collect(prev[0]), prev[1])
            self._set_drafts()
        elif self.overlap:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        return self._run_now(batch)

    def _run_now(self, batch: ScheduledBatch) -> list[RequestOutput]:
        masks = self._grammar_masks(batch)
        # Unconstrained batches make the same one-argument call as before structured outputs.
        samples = self.runner.execute(batch) if masks is None else \
            self.runner.execute(batch, masks)
        return self._process(batch, samples)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Overlap scheduling: launch step N+1 before reading step N's tokens, so the host
        schedules and prepares while the device computes. Until read, N's tokens are
        PLACEHOLDERs in the requests, which the device fills in. A batch that needs them on
        the host (grammar masks, penalties) waits for them and runs synchronously."""
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule()
        if batch and not any(self._needs_host_tokens(sq.request) for sq in batch.seqs):
            launched = self.runner.launch(batch, prev[0] if prev else None)
            self._inflight = (launched, self._add_placeholders(batch))
            batch = ScheduledBatch([])
        outs = self._process(prev[0].batch, self.runner.collect(prev[0]), prev[1]) if prev else []
        batch = self._resolve(batch)
        if batch:
            outs += self._run_now(batch)
        return list({id(o): o for o in outs}.values())

    def _drafting(self) -> list[Request]:
        return [r for r in self.scheduler.running
                if r.num_tokens - r.num_computed_tokens == 1
                and r.request_id not in self._matchers and r.params.prompt_logprobs is None]

    def _may_speculate(self) -> bool:
        """Whether this step may speculate: a proposer, and few enough running requests."""
        if self.proposer is None:
            return False
        n = len(self.scheduler.running)
        return 0 < n and (self.spec_max_batch is None or n <= self.spec_max_batch)

    def _set_drafts(self) -> None:
        running = self.scheduler.running
        if any(r.num_tokens - r.num_computed_tokens > 1 for r in running):
            return  # the scheduler takes no drafts while prompt chunks run: propose none
        reqs = self._drafting()
        if reqs:
            for r, d in zip(reqs, self.proposer.propose(reqs, self.num_draft_tokens),
                            strict=True):
                r.draft_token_ids = d[:self.num_draft_tokens]

    def _needs_host_tokens(self, req: Request) -> bool:
        # Prompt logprobs run their own step, which takes no placeholders.
        return (req.request_id in self._matchers or req.params.uses_penalties
                or req.params.prompt_logprobs is not None)

    @staticmethod
    def _add_placeholders(batch: ScheduledBatch) -> dict[str, int]:
        where = {}
        for sq in batch.seqs:
            if sq.sample:
                where[sq.request.request_id] = len(sq.request.output_token_ids)
                sq.request.output_token_ids.append(PLACEHOLDER)
        return where

    @staticmethod
    def _resolve(batch: ScheduledBatch) -> ScheduledBatch:
        """The batch once the previous step's tokens are read: placeholders replaced, and
        requests that finished meanwhile (their pages are released) dropped."""
        seqs = []
        for sq in batch.seqs:
            if sq.request.finished:
                continue
            if PLACEHOLDER in sq.token_ids:
                sq.token_ids = sq.request.all_token_ids[sq.start_pos:
                                                        sq.start_pos + len(sq.token_ids)]
            seqs.append(sq)
        return ScheduledBatch(seqs, batch.preempted)

    def _grammar_masks(self, batch: ScheduledBatch) -> GrammarMasks | None:
        """The constrained rows that sample this step, or None when there are none."""
        if not self._matchers:
            return None
        rows = [(m, i) for i, seq in enumerate(batch.seqs)
                if seq.sample and (m := self._matchers.get(seq.request.request_id)) is not None]
        if not rows:
            return None
        backend = self.grammar_compiler().backend
        # Mask rows are logits rows: a seq with drafts has more than one (none here).
        at = batch.logit_rows()
        rows = [(m, at[i]) for m, i in rows]
        return GrammarMasks([i for _, i in rows], backend.mask_words,
                            lambda bitmask: backend.fill_masks(rows, bitmask))

    def _process(self, batch: ScheduledBatch,
                 samples: list[TokenSample | list[TokenSample] | None],
                 placeholders: dict[str, int] | None = None) -> list:
        touched: dict[str, RequestOutput] = {}
        owner, groups = self._owner, self._groups
        tally = self._tally
        if tally is not None:
            tally.count(batch, samples)
        for seq, s in zip(batch.seqs, samples, strict=True):
            if s is None or seq.request.finished:
                continue
            rid, idx = owner[seq.request.request_id]
            group = groups[rid]
            if seq.num_draft:  # s: the target's token after each position
                drafts = seq.token_ids[len(seq.token_ids) - seq.num_draft:]
                n = num_accepted(drafts, [x.token for x in s])
                if tally is not None:
                    tally.accepted += n
                self.scheduler.accept_drafts(seq.request, seq.num_draft, n)
                for x in s[:n + 1]:
                    self._append(seq.request, group, idx, x)
                    if seq.request.finished:
                        break
            else:
                at = placeholders.get(seq.request.request_id) if placeholders else None
                self._append(seq.request, group, idx, s, at)
            touched[rid] = group.output
        for rid, out in touched.items():
            children = groups[rid].children
            out.num_cached_tokens = (children[0].num_cached_tokens if len(children) == 1 else
                                     max(c.num_cached_tokens for c in children))
            if out.finished:
                for child in groups.pop(rid).children:
                    owner.pop(child.request_id, None)
        return list(touched.values())

    def _append(self, req: Request, group: _Group, idx: int, s: TokenSample,
                at: int | None = None) -> None:
        """Record a sampled token: appended, or written over its PLACEHOLDER at index `at`."""
        p, comp, detok, token = req.params, group.output.outputs[idx], group.detoks[idx], s.token
        if at is None:
            req.output_token_ids.append(token)
        else:
            req.output_token_ids[at] = token
        comp.token_ids.append(token)
        if p.prompt_logprobs is not None and group.output.prompt_logprobs is None:
            # The first token: the whole prompt has been computed.
            group.output.prompt_logprobs = [req.prompt_logprobs.get(i)
                                            for i in range(req.num_prompt_tokens)]
        if p.logprobs is not None:
            comp.logprobs = comp.logprobs or []
            comp.logprobs.append({s.token: s.logprob, **dict(s.top)})
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + s.logprob
        n_out = len(req.output_token_ids) if at is None else at + 1
        reason, stop_reason = None, None
        past_min = n_out >= p.min_tokens
        matcher = self._matchers.get(req.request_id) if self._matchers else None
        accepted = matcher is None or matcher.accept(token)
        if not accepted:
            # The mask allowed only what the grammar accepts, so this is a bug, not the user's.
            log.error("request %s: the grammar rejected sampled token %d (%s)", req.request_id,
                      s.token, matcher.error())
            reason = "abort"
        elif past_min and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif past_min and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif detok is not None:
            comp.text += detok.add((token,))
            if detok.stopped is not None:  # only ever past min_tokens (the detokenizer's rule)
                reason, stop_reason = "stop", detok.stopped
        if reason is None and matcher is not None and matcher.is_terminated():
            reason = "stop"  # the grammar is complete: only EOS could follow
        if reason is None and (n_out >= req.max_total_tokens - req.num_prompt_tokens):
            reason = "length"
        if reason is not None:
            self._matchers.pop(req.request_id, None)
            if detok is not None and detok.stopped is None:
                comp.text += detok.finish()
            comp.finish_reason, comp.stop_reason = reason, stop_reason
            del req.output_token_ids[n_out:]  # a later step's placeholder, already launched
            self.scheduler.finish(req, reason)
