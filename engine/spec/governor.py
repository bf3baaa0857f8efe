"""Whether speculation pays, measured while it runs.

A speculative step runs synchronously (its proposer needs the previous step's tokens) and
yields 1 + (accepted drafts) tokens a row; a plain step is overlapped and yields one. Which
gives more tokens a second depends on the device, the proposer and the text. On an H200
(2026-12-04, Llama-3.1-8B shape, batch 1, 4 drafts; docs/benchmarks.md) a plain decode step
took 4.5 ms; a speculative step took 6.8 ms with n-gram drafts (it pays above 1.5 tokens a
step), 14.2 ms with an EAGLE-3 head (above 3.2) and 48 ms with an 8B draft model (above
10.6: never, at most 5 come out). On the 2-core CPU n-gram drafts on a text to repeat made
decoding 2.56x faster. No fixed rule covers these, so the engine measures both kinds of
step: an exponential average of each kind's seconds a step, and of the tokens a row a
speculative step yields, and speculates while

    tokens_per_row(spec) / seconds(spec) >= 1 / seconds(plain).

It first runs a few steps of each kind; afterwards, every `probe_every` decisions, it runs
`probe_steps` steps of the kind it does not favour, so that a change (a text that turns
repetitive, a batch that grows) is seen. The first step after a switch is not measured: it
collects the other kind's step in flight. Only steps of decodes alone are measured (a step
with prompt tokens costs what its prompt costs). Outputs do not depend on the choice: greedy
and seeded rows give the same tokens with and without speculation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class StepTally:
    """What a governed step yields, counted by the engine as it processes the step."""

    rows: int = 0
    """Rows that sampled (of requests not finished before)."""
    accepted: int = 0
    """Drafts accepted over those rows."""
    prompt: bool = False
    """Whether the step had prompt tokens (then it is not measured)."""

    def count(self, batch: Any, samples: Sequence[Any]) -> None:
        """A processed batch (engine.core.request.ScheduledBatch) and its samples."""
        self.rows += sum(s is not None and not sq.request.finished
                         for sq, s in zip(batch.seqs, samples, strict=True))
        self.prompt = self.prompt or any(len(sq.token_ids) - sq.num_draft > 1
                                         for sq in batch.seqs)

    def tokens_per_row(self) -> float | None:
        """Tokens a sampled row (1 + accepted drafts), None when not to be measured."""
        return None if self.prompt or not self.rows else 1 + self.accepted / self.rows


class SpecGovernor:
    def __init__(self, probe_every: int = 64, probe_steps: int = 4, alpha: float = 0.25,
                 warm: int = 3) -> None:
        """`alpha`: weight of a new step in the averages; `warm`: measured steps of each
        kind before the rule decides."""
        if not 0 < probe_steps < probe_every:
            raise ValueError(f"need 0 < {probe_steps=} < {probe_every=}")
        self.probe_every, self.probe_steps, self.alpha, self.warm = (probe_every, probe_steps,
                                                                     alpha, warm)
        self.seconds: dict[bool, float | None] = {True: None, False: None}
        """Average seconds of a speculative (True) and a plain (False) step."""
        self.tokens: float | None = None
        """Average tokens a row of a speculative step."""
        self.measured = {True: 0, False: 0}
        self._decisions = 0
        self._last: bool | None = None
        self._favoured: bool | None = None

    def pays(self) -> bool | None:
        """Whether speculating gives more tokens a second (None: not measured yet)."""
        spec, plain = self.seconds[True], self.seconds[False]
        if spec is None or plain is None or self.tokens is None:
            return None
        return self.tokens * plain >= spec

    def decide(self) -> bool:
        """Whether the next step (one that may speculate) speculates."""
        self._decisions += 1
        for kind in (True, False):  # each kind measured first, speculation first
            if self.measured[kind] < self.warm:
                return kind
        favoured = bool(self.pays())
        if favoured != self._favoured:
            self._favoured = favoured
            log.info("speculation %s: %.2f tokens a row in %.2f ms a step, %.2f ms without",
                     "on" if favoured else "off", self.tokens, self.seconds[True] * 1e3,
                     self.seconds[False] * 1e3)
        probing = self._decisions % self.probe_every < self.probe_steps
        return favoured != probing

    def observe(self, spec: bool, seconds: float, tokens_per_row: float | None) -> None:
        """A step that `decide` chose: its wall seconds and tokens a sampled row (None: the
        step had prompt tokens or no row sampled: not measured)."""
        switched, self._last = spec != self._last, spec
        if switched or tokens_per_row is None:
            return
        self.seconds[spec] = self._average(self.seconds[spec], seconds)
        if spec:
            self.tokens = self._average(self.tokens, tokens_per_row)
        self.measured[spec] += 1

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)
