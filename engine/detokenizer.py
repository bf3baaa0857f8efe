"""Incremental detokenization with stop strings, one request at a time.

Decoding: the vLLM prefix/read-offset scheme over token ids. `_ids[:read]` is a short window
of tokens whose text was already produced (context, so that leading-space stripping and byte
merging decode as in the full text); `_ids[read:]` are tokens not yet turned into text. The new
text is decode(_ids) minus decode(_ids[:read]). Text ending in U+FFFD (an incomplete UTF-8
character) is held back until the character completes; at the end it is dropped, so text cut
inside a character (a length stop) never ends in U+FFFD. Once text is produced, the tokens that
made it become the whole context, so the window stays a few tokens long and per-token cost does
not depend on the output length.

Stop strings: decoded text goes to `_held` first. A stop string found there ends the request;
otherwise everything is emitted except the longest suffix of `_held` that is a prefix of some
stop string. Hence a stop string can only start inside `_held` and no prefix of it is emitted
before it resolves.

min_tokens (as vLLM): a stop string counts only where it ends in text of a token after the
first `min_tokens`; it may start earlier. `_guarded` leading characters of `_held` are text
of those first tokens, where no match may end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

PROMPT_CONTEXT = 5
"""Prompt tokens kept as decoding context for the first output tokens (as vLLM)."""
MAX_PENDING = 16
"""Tokens without a complete character held at most before their text is produced anyway, to
bound the window. A UTF-8 character has at most 4 bytes, so only invalid output (a long run of
stray bytes) gets here, and only then may the text differ from a full decode."""


class IncrementalDetokenizer:
    """Turns generated token ids into text safe to stream, and detects stop strings.

    `tokenizer` is a transformers tokenizer (only `decode(ids, skip_special_tokens=...)` is used).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        token_texts: dict[int, str] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._token_texts = token_texts
        """decode([id]) by id, shared by the detokenizers of one tokenizer and one
        skip_special_tokens (the caller's): a one-token decode depends on nothing else, and
        after each character completes the context is one token, so it saves one of the two
        decodes of most tokens."""
        self._skip_special = skip_special_tokens
        self._rust_decode = _rust_decode(tokenizer)
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0  # generated tokens added so far
        self._guarded = 0  # leading chars of _held where no stop string may end
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])  # context + pending tokens
        self._read = len(self._ids)  # _ids[:_read] is context, _ids[_read:] not yet text
        self._context_text = self._decode(self._ids)
        self._held = ""  # decoded text not yet emitted: it may start a stop string
        self._chunks: list[str] = []
        self._finished = False
        self.stopped: str | None = None
        """The stop string that ended the request, or None."""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the new text that is safe to emit ("" once stopped)."""
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self.stopped is not None:
            return ""
        for token_id in token_ids:
            self._ids.append(token_id)
            self._num_tokens += 1
            self._held += self._decode_pending(final=False)
            if self._num_tokens <= self._min_tokens:
                self._guarded = len(self._held)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush text held back (stop-string prefixes); an incomplete last
        character is dropped."""
        if self._finished or self.stopped is not None:
            self._finished = True
            return ""
        self._finished = True
        self._held += self._decode_pending(final=True)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        if len(ids) == 1 and self._token_texts is not None:
            text = self._token_texts.get(ids[0])
            if text is None:
                text = self._token_texts[ids[0]] = self._decode_ids(ids)
            return text
        return self._decode_ids(ids)

    def _decode_ids(self, ids: list[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _decode_pending(self, final: bool) -> str:
        """Text of the tokens in _ids[_read:], or "" while it ends in an incomplete character."""
        full = self._decode(self._ids)
        incomplete = len(full) <= len(self._context_text) or full.endswith("\ufffd")
        if incomplete and not final and len(self._ids) - self._read <= MAX_PENDING:
            return ""
        new = full[len(self._context_text) :]
        if final:  # an incomplete last character (cut by a length stop) is dropped, as vLLM
            new = new.rstrip("\ufffd")
        del self._ids[: self._read]  # the tokens just decoded become the context
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new

    def _release(self, final: bool) -> str:
        """Move text from _held to the output, stopping at the earliest stop string."""
        if not self._stop:  # nothing to look for or hold back (_guarded never exceeds _held)
            out, self._held, self._guarded = self._held, "", 0
            if out:
                self._chunks.append(out)
            return out
        match = self._find_stop(self._held)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            out, self._held, self.stopped = self._held[:end], "", stop
        else:
            keep = 0 if final else self._stop_prefix_len(self._held)
            cut = len(self._held) - keep
            out, self._held = self._held[:cut], self._held[cut:]
            self._guarded = max(0, self._guarded - cut)
        if out:
            self._chunks.append(out)
        return out

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest match ending past the guarded text; ties go
        to the first listed."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = text.find(s, max(0, self._guarded - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def _rust_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The `tokenizers` library's decode behind a transformers fast tokenizer, where the
    tokenizer's own decode (with cleanup off, as called here) is exactly a call of it: the
    class overrides neither `decode` nor `_decode`. Two decodes run per generated token per
    request on the engine thread, and transformers' Python wrapper around them costs about as
    much as the decode itself. None otherwise (the tokenizer's decode is used)."""
    fast = sys.modules.get("transformers.tokenization_utils_tokenizers")
    base = getattr(fast, "TokenizersBackend", None)
    if base is None or not isinstance(tokenizer, base):
        return None
    cls = type(tokenizer)
    if cls.decode is not base.decode or cls._decode is not base._decode:
        return None
    return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)
