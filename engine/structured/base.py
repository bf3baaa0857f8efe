"""The grammar backend contract: compile a constraint once, match it per request.

Pure Python: the grammar library is imported only by the backend that wraps it,
and only when a constraint is first requested.

A token bitmask row is int32 [W], W = ceil(V / 32): bit (t % 32) of word (t // 32) is set when
token t may come next. Tokens the backend's tokenizer does not know (a model vocabulary padded
past the tokenizer's) are never allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # numpy only in annotations: SamplingParams (and engine.core) import this
    import numpy as np

KINDS = ("json_schema", "regex", "ebnf", "choice")
"""Constraint kinds, as SamplingParams names them."""


class GrammarError(ValueError):
    """The constraint does not compile; the message says why, for the client (a 400)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"invalid {kind}: {message}")
        self.param = kind


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """One constraint in canonical text form (the cache key)."""

    kind: str
    """One of KINDS."""
    text: str
    """json_schema: the schema as JSON text, keys in their given order (properties are
    generated in that order); regex: the pattern; ebnf: the grammar (GBNF `root ::= ...` or
    Lark `start: ...`); choice: a JSON list of the strings."""


class Matcher(Protocol):
    """The grammar state of one sequence. Advances only through `accept`."""

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into `row` (int32 [W], C-contiguous)."""

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False (and the matcher is unusable) if not allowed."""

    def is_terminated(self) -> bool:
        """True when nothing but end-of-sequence may follow: the output is complete."""

    def error(self) -> str:
        """Why the matcher failed, or '' when it has not."""


class Compiled(Protocol):
    """A compiled constraint, shared by every request that asks for the same spec."""

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar."""


class GrammarBackend(Protocol):
    """A grammar library bound to one tokenizer and one model vocabulary."""

    name: str
    mask_words: int
    """W: int32 words of one bitmask row (covers the model's and the tokenizer's vocab)."""

    def compile(self, spec: GrammarSpec) -> Compiled:
        """Compile `spec`; raises GrammarError with a short, actionable message."""

    def fill_masks(self, rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """Fill bitmask[i] (int32 [S, W]) for each (matcher, i); other rows are untouched."""


def mask_words(vocab_size: int) -> int:
    """W: int32 words of a bitmask row over `vocab_size` tokens."""
    return -(-vocab_size // 32)


BackendFactory = Any
"""(tokenizer, vocab_size, eos_token_ids) -> GrammarBackend; see engine.structured.BACKENDS."""
