"""/generate's streamed events at a cost per event that does not grow with the output.

SGLang's protocol sends, in every event, the whole text and all output ids so far. Encoding
them afresh with json.dumps costs O(tokens so far) per event, O(tokens^2) per request: at 400
streams of ~256 tokens that was ~12 ms of event-loop time per engine step on a 2-core EPYC,
more than the detokenizer. Both are kept here already encoded and only grow: JSON escapes a
string character by character, so the escape of the concatenation is the concatenation of the
escapes, and an id list's items are written once. The event is then a few string copies.

Since every event carries the whole state, deltas that queued up while the event loop was busy
are folded into one event per changed choice (as SGLang sends only a request's latest state):
a stream that falls behind catches up in one write instead of one write per step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from engine.server.requests import RequestGroup


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


async def cumulative_events(group: RequestGroup, n: int, fold: Callable[[Any], None],
                            rest: Callable[[int], dict[str, Any]]) -> AsyncIterator[str]:
    """The group's events, each the JSON of one choice's whole state so far: `fold(delta)`
    records a delta (for `rest`), `rest(i)` gives choice i's keys after text and output_ids.
    One event per changed choice once no further delta is queued."""
    encoded: dict[int, CumulativeJson] = {}
    changed: dict[int, None] = {}  # choice indices (prompt * n + choice), first change first
    async for d in group:
        fold(d)
        for c in d.choices:
            i = d.prompt_index * n + c.index
            encoded.setdefault(i, CumulativeJson()).add(c.text, c.token_ids)
            changed[i] = None
        if group.ready():
            continue
        for i in changed:
            yield encoded[i].encode(rest(i))
        changed.clear()
