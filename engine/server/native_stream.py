"""/generate's streamed events at a cost per event that does not grow with the output.

SGLang's protocol sends, in every event, the whole text and all output ids so far. Encoding
them afresh with json.dumps costs O(tokens so far) per event, O(tokens^2) per request: at 400
streams of ~256 tokens that was ~12 ms of event-loop time per engine step on a 2-core EPYC,
more than the detokenizer. Both are kept here already encoded and only grow: JSON escapes a
string character by character, so the escape of the concatenation is the concatenation of the
escapes, and an id list's items are written once. The event is then a few string copies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class CumulativeJson:
    """One choice's text and output ids so far, held as the JSON that encodes them."""

    def __init__(self) -> None:
        self._text = ""  # json.dumps(all text, ensure_ascii=False) without its quotes
        self._ids = ""  # the items of json.dumps(all ids), ", "-separated, no brackets

    def add(self, text: str, token_ids: Sequence[int]) -> None:
        """Append a delta: new text and new token ids."""
        if text:
            self._text += json.dumps(text, ensure_ascii=False)[1:-1]
        if token_ids:
            more = ", ".join([str(int(t)) for t in token_ids])
            self._ids = f"{self._ids}, {more}" if self._ids else more

    def encode(self, rest: dict[str, Any]) -> str:
        """Exactly json.dumps({"text": all text, "output_ids": all ids, **rest},
        ensure_ascii=False) (rest must have neither key)."""
        head = f'{{"text": "{self._text}", "output_ids": [{self._ids}]'
        if not rest:
            return head + "}"
        return head + ", " + json.dumps(rest, ensure_ascii=False)[1:]
