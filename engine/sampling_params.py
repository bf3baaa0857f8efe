"""User-facing sampling parameters, validated at construction (the vLLM/SGLang shape)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from engine.structured.base import KINDS, GrammarSpec
from engine.structured.schema import strict_schema

MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int | None = 16
    """Tokens to generate at most; None means up to the context length."""
    min_tokens: int = 0
    """The first this many tokens are never a stop: EOS and stop_token_ids are banned from
    sampling, and a stop string counts only where it ends in a later token (as vLLM)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    """Same seed, same output, whatever else is in the batch."""
    n: int = 1
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the top k alternatives."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: each prompt token's logprob (the first has none) plus the top k
    alternatives, computed in the prompt's own steps."""
    prompt_logprobs_start: int = 0
    """Prompt positions before this get no prompt logprobs (SGLang's logprob_start_len);
    the prefix cache still serves them."""
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    # Structured outputs: at most one constraint; the output then matches it and ends
    # (finish_reason "stop") as soon as the grammar is complete.
    json_schema: str | dict[str, Any] | None = None
    """A JSON schema (object or its JSON text); {"type": "object"} is any JSON object. Strict:
    an object with `properties` allows no others unless it sets `additionalProperties`."""
    regex: str | None = None
    """The whole output matches this regular expression (Rust `regex` syntax)."""
    ebnf: str | None = None
    """A context-free grammar: GBNF (`root ::= ...`) or Lark (`start: ...`)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._check()

    def _check(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.n < 1:
            bad("n", "must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs_start < 0:
            bad("prompt_logprobs_start", "must be non-negative")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad("seed", "must be a non-negative 63-bit integer")
        if any(t < 0 for t in self.stop_token_ids or []):
            bad("stop_token_ids", "must be non-negative token ids")
        for tok, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {tok} must be in [-100, 100], got {bias}")
        self._check_constraint()

    def _check_constraint(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]} cannot be combined with {given[0]}: give at most one "
                             "of json_schema, regex, ebnf and choice")
        schema = self.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if schema is not None and not isinstance(schema, dict | bool):
            raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        for field in ("regex", "ebnf"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{field} must be a non-empty string, got {value!r}")
        if self.choice is not None and (
                not isinstance(self.choice, list) or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def grammar(self) -> GrammarSpec | None:
        """The constraint in canonical form (None when unconstrained)."""
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                schema = json.loads(schema)
            # Key order kept: properties are generated in the schema's order. Strict: objects
            # that name their properties allow no others unless the schema says so.
            return GrammarSpec("json_schema", json.dumps(strict_schema(schema)))
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        if self.ebnf is not None:
            return GrammarSpec("ebnf", self.ebnf)
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice))
        return None

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
