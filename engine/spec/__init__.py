"""Speculative decoding: proposers of draft tokens, and the rule that accepts them.

A proposer guesses the next k tokens of running decodes; the target model scores each decode
with its drafts in one ragged step (a 1 + k token row, causal inside the draft) and samples
the token after every position; `accept.num_accepted` keeps the longest run of drafts that
equals what the target sampled. The rule (engine.spec.accept), the n-gram proposer
(engine.spec.ngram) and the governor that decides whether speculating pays
(engine.spec.governor) are plain Python; the model proposers run one jitted program a
proposal over runners the builder makes: a draft model's (engine.spec.draft, its program in
engine.spec.draft_step) and the EAGLE-3 head's (engine.spec.eagle over
engine.spec.eagle_runner and engine.spec.eagle_head).
"""

from __future__ import annotations

from typing import Protocol

from engine.core.request import Request


class Proposer(Protocol):
    """Guesses the tokens that follow each request's tokens."""

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        """Up to k draft tokens to follow each request's all_token_ids (may be empty)."""
        ...
