"""Structured outputs: grammar backends by name, and a cache of compiled constraints.

`GrammarCompiler(backend).matcher(spec)` gives each request its own matcher; constraints are
compiled once per distinct spec. Backends are imported lazily, so the engine runs
unconstrained on a host without any grammar library.
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from engine.structured.base import (
    KINDS,
    Compiled,
    GrammarBackend,
    GrammarError,
    GrammarSpec,
    Matcher,
    mask_words,
)

__all__ = ["BACKENDS", "KINDS", "GrammarBackend", "GrammarCompiler", "GrammarError",
           "GrammarSpec", "Matcher", "make_backend", "mask_words"]

DEFAULT_BACKEND = "llguidance"
CACHE_SIZE = 256
"""Compiled constraints kept (least recently used first out)."""


def _lazy(module: str, cls: str) -> Callable[..., GrammarBackend]:
    def make(*args: Any) -> GrammarBackend:
        return getattr(importlib.import_module(module), cls)(*args)

    return make


BACKENDS: dict[str, Callable[..., GrammarBackend]] = {
    "llguidance": _lazy("engine.structured.llguidance_backend", "LLGuidanceBackend"),
}
"""name -> factory(tokenizer, vocab_size, eos_token_ids)."""


def make_backend(name: str, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> GrammarBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name](tokenizer, vocab_size, eos_token_ids)


class GrammarCompiler:
    """Compiled constraints by spec (an LRU cache), and matchers from them."""

    def __init__(self, backend: GrammarBackend, cache_size: int = CACHE_SIZE) -> None:
        self.backend = backend
        self._cache: collections.OrderedDict[GrammarSpec, Compiled] = collections.OrderedDict()
        self._cache_size = cache_size

    def compile(self, spec: GrammarSpec) -> Compiled:
        """Raises GrammarError (a ValueError) when the spec does not compile."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        compiled = self.backend.compile(spec)
        self._cache[spec] = compiled
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> Matcher:
        return self.compile(spec).matcher()
