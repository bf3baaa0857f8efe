"""The engine step loop: receive -> schedule -> run -> process outputs.

Works on token ids; stop strings need text, so each request's incremental detokenizer
lives here too. The scheduler decides everything about pages; the runner computes.
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
from engine.outputs import CompletionOutput, RequestOutput
from engine.runner import ModelRunner, TokenSample
from engine.sampling_params import SamplingParams

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
                 seed: int = 0) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self._groups: dict[str, _Group] = {}
        self._owner: dict[str, tuple[str, int]] = {}  # child id -> (user request id, index)
        self._rng = random.Random(seed)
        self._ids = itertools.count()

    # -- receive -------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, prompt: str | None = None) -> str:
        """Validate and queue. Raises ValueError with a user-actionable message."""
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
        self._groups[request_id] = _Group(out, children, detoks)
        return request_id

    def _detokenizer(self, prompt_ids: list[int], p: SamplingParams):
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=p.skip_special_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output)

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for child, comp in zip(group.children, group.output.outputs, strict=True):
            self._owner.pop(child.request_id, None)
            if self.scheduler.abort(child.request_id) is not None or comp.finish_reason is None:
                comp.finish_reason = comp.finish_reason or "abort"
        return group.output

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of user requests that made progress."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        samples = self.runner.execute(batch)
        return self._process(batch, samples)

    def _process(self, batch: ScheduledBatch, samples: list[TokenSample | None]) -> list:
        touched: dict[str, RequestOutput] = {}
        for seq, s in zip(batch.seqs, samples, strict=True):
            if s is None or seq.request.finished:
                continue
            rid, idx = self._owner[seq.request.request_id]
            group = self._groups[rid]
            self._append(seq.request, group, idx, s)
            touched[rid] = group.output
        for rid, out in touched.items():
            out.num_cached_tokens = max(c.num_cached_tokens for c in self._groups[rid].children)
            if out.finished:
                for child in self._groups.pop(rid).children:
                    self._owner.pop(child.request_id, None)
        return list(touched.values())

    def _append(self, req: Request, group: _Group, idx: int, s: TokenSample) -> None:
        p, comp, detok = req.params, group.output.outputs[idx], group.detoks[idx]
        req.output_token_ids.append(s.token)
        comp.token_ids.append(s.token)
        if p.logprobs is not None:
            comp.logprobs = comp.logprobs or []
            comp.logprobs.append({s.token: s.logprob, **dict(s.top)})
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + s.logprob
        n_out = len(req.output_token_ids)
        reason, stop_reason = None, None
        past_min = n_out >= p.min_tokens
        if past_min and not p.ignore_eos and s.token in self.eos_token_ids:
            reason = "stop"
        elif past_min and s.token in p.stop_token_ids:
            reason, stop_reason = "stop", s.token
        elif detok is not None:
            comp.text += detok.add([s.token])
            if past_min and detok.stopped is not None:
                reason, stop_reason = "stop", detok.stopped
        if reason is None and (n_out >= req.max_total_tokens - req.num_prompt_tokens):
            reason = "length"
        if reason is not None:
            if detok is not None and detok.stopped is None:
                comp.text += detok.finish()
            comp.finish_reason, comp.stop_reason = reason, stop_reason
            self.scheduler.finish(req, reason)
