"""The llguidance grammar backend (https://github.com/guidance-ai/llguidance).

Chosen over xgrammar (measurements in docs/benchmarks.md): a matcher is built in about a
millisecond where xgrammar compiles a JSON schema in hundreds (the engine thread compiles at
add_request, so that would stall every running request), it has no dependencies (xgrammar
needs torch), and its per-token mask time is well below a decode step on every device we run.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.structured.base import GrammarError, GrammarSpec, Matcher, mask_words

MAX_MESSAGE = 400
"""Library error messages are cut to this many characters for the client."""
MAX_MASK_THREADS = 8
"""Threads that fill the masks of a batch in parallel (fewer on smaller hosts)."""


def _import() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured outputs need the llguidance package, which is not "
                         "installed on this server (pip install llguidance)") from None
    return llguidance


def _short(message: str) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class LLGuidanceMatcher:
    """One sequence's llguidance matcher."""

    def __init__(self, m: Any) -> None:
        self._m = m

    def fill_mask(self, row: np.ndarray) -> None:
        # The library writes row.nbytes bytes at the row's address (checked against its vocab).
        if row.dtype != np.int32 or row.ndim != 1 or not row.flags["C_CONTIGUOUS"]:
            raise ValueError(f"a mask row must be C-contiguous int32 [W], got {row.dtype} "
                             f"{row.shape}")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    def is_terminated(self) -> bool:
        # Stopped: the grammar is complete and allows only EOS (or the matcher failed).
        return bool(self._m.is_stopped())

    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


class _Compiled:
    """A validated grammar as a fresh matcher; requests get deep copies (~20 µs), which
    share its lexer instead of building their own (~ms for a JSON schema)."""

    def __init__(self, template: Any) -> None:
        self._template = template

    def matcher(self) -> Matcher:
        return LLGuidanceMatcher(self._template.deep_copy())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """`tokenizer`: a transformers fast tokenizer; `vocab_size`: the model's (the logits
        width), which may exceed the tokenizer's; the extra ids are never allowed."""
        lg = self._lg = _import()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("structured outputs need a fast (Rust) tokenizer")
        backend = copy.copy(backend)  # the serialized copy must not pad or truncate
        backend.no_padding()
        backend.no_truncation()
        n_vocab = max(vocab_size, len(tokenizer))
        self._tok = lg.LLTokenizer(backend.to_str(), n_vocab=n_vocab,
                                   eos_token=list(eos_token_ids) or None)
        self.mask_words = mask_words(n_vocab)
        self._executor = lg.LLExecutor(num_threads=min(MAX_MASK_THREADS, os.cpu_count() or 1))

    def compile(self, spec: GrammarSpec) -> _Compiled:
        lg = self._lg
        try:
            if spec.kind == "json_schema":
                grammar = lg.LLMatcher.grammar_from_json_schema(spec.text)
            elif spec.kind == "regex":
                grammar = lg.LLMatcher.grammar_from_regex(spec.text)
            elif spec.kind == "ebnf":  # GBNF (`root ::= ...`) or Lark (`start: ...`)
                grammar = lg.grammar_from("ebnf", spec.text)
            elif spec.kind == "choice":
                grammar = lg.grammar_from("choice", json.loads(spec.text))
            else:
                raise GrammarError(spec.kind, "unknown constraint kind")
        except GrammarError:
            raise
        except (ValueError, TypeError) as e:
            raise GrammarError(spec.kind, _short(str(e))) from None
        # Never raises for a bad grammar: the matcher starts in its error state instead.
        m = lg.LLMatcher(self._tok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(spec.kind, _short(m.get_error()))
        return _Compiled(m)

    def fill_masks(self, rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        if bitmask.dtype != np.int32 or bitmask.shape[1] != self.mask_words \
                or not bitmask.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask must be C-contiguous int32 [S, {self.mask_words}], got "
                             f"{bitmask.dtype} {bitmask.shape}")
        if len(rows) == 1:  # the thread pool costs more than it saves for one row
            m, i = rows[0]
            m.fill_mask(bitmask[i])
            return
        pairs = [(m._m, i) for m, i in rows]  # type: ignore[attr-defined]
        if any(not 0 <= i < bitmask.shape[0] for _, i in pairs):
            raise ValueError(f"row index out of range for {bitmask.shape[0]} rows")
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, bitmask.shape[1] * 4,
                                               bitmask.shape[0])
