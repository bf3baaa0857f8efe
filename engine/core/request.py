"""Requests and the plain data the scheduler hands to the model runner.

Pure Python: no jax, nothing from backends/. The runner sees only `ScheduledBatch`.
"""

from __future__ import annotations

import dataclasses
import enum

from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    """Resolved sampling seed: the user's, or one drawn when the request was made."""
    arrival: float = 0.0
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    """Tokens whose K/V are in this request's pages. Positions [0, num_computed) are done."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the (last) admission."""
    page_ids: list[int] = dataclasses.field(default_factory=list)
    """Pages holding this request's K/V, in order; position p lives in page_ids[p // page_size]."""
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length', 'abort' or an error message."""
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    max_total_tokens: int = 0
    """Prompt + output tokens this request may reach (set by the engine from max_tokens)."""
    group: str | None = None
    """Sibling group of an n > 1 request (same prompt): the scheduler shares its prompt pages."""
    prompt_logprobs: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)
    """Prompt position -> {its token: logprob, top alternatives...}, as the runner computes
    them (params.prompt_logprobs)."""
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Speculative decoding: tokens proposed to follow this decode, set by the engine before
    a step and consumed by the scheduler (which may schedule fewer); never part of the
    request's tokens until the target model has verified them."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: compute K/V (and logits) for `token_ids`."""

    request: Request
    token_ids: list[int]
    """Tokens computed this step, at positions start_pos, start_pos+1, ..."""
    start_pos: int
    page_ids: list[int]
    """All pages of the request, covering positions [0, start_pos + len(token_ids))."""
    sample: bool
    """True when the step reaches the end of the known tokens: a new token is sampled."""
    num_draft: int = 0
    """Speculative decoding: the last num_draft of token_ids are unverified draft tokens.
    The step returns the target's token after each of the last num_draft + 1 positions."""


@dataclasses.dataclass
class ScheduledBatch:
    """What one engine step computes: a mixed, ragged batch of prompt chunks and decodes."""

    seqs: list[ScheduledSeq]
    preempted: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def logit_rows(self) -> list[int]:
        """Each seq's last row among the step's sampled logits rows: a seq that samples
        has 1 + num_draft rows, one after each of its last 1 + num_draft tokens (in order);
        a seq that does not sample has one unused row."""
        rows, off = [], -1
        for sq in self.seqs:
            off += 1 + sq.num_draft
            rows.append(off)
        return rows

    @property
    def num_rows(self) -> int:
        return len(self.seqs) + sum(sq.num_draft for sq in self.seqs)
