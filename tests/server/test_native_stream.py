"""/generate's pre-encoded streaming events equal json.dumps of the cumulative item."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling_params import SamplingParams
from engine.server.native_stream import CumulativeJson, cumulative_events
from engine.server.requests import ChoiceDelta, Delta, RequestGroup

# Quotes, backslashes, control characters, multi-byte and astral characters all need escapes
# (or must pass through unescaped with ensure_ascii=False) at piece boundaries.
pieces = st.text(alphabet=st.sampled_from(
    list('ab "\\/\n\t\r\x00\x1f\x7f') + list("é你好🎉\u2028\ufffd")), max_size=6)
deltas = st.lists(st.tuples(pieces, st.lists(st.integers(0, 200_000), max_size=4)), max_size=12)
rests = st.sampled_from([
    {},
    {"meta_info": {"id": "gen-1", "completion_tokens": 3, "finish_reason": None,
                   "e2e_latency": 0.125}},
    {"meta_info": {"finish_reason": {"type": "stop", "matched": "é\"\n"}}, "index": 2},
])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(deltas=deltas, rest=rests)
def test_every_event_equals_a_full_encode(deltas, rest):
    enc, text, ids = CumulativeJson(), "", []
    for piece, toks in deltas:
        enc.add(piece, toks)
        text, ids = text + piece, ids + toks
        got = enc.encode(rest)
        assert got == json.dumps({"text": text, "output_ids": ids, **rest}, ensure_ascii=False)
        assert json.loads(got)["text"] == text


def test_empty_choice_and_numpy_like_ids():
    enc = CumulativeJson()
    assert json.loads(enc.encode({})) == {"text": "", "output_ids": []}

    class Id(int):  # an int subclass (numpy's ints convert the same way through int())
        def __str__(self) -> str:
            return "not-a-number"

    enc.add("x", [Id(7), 8])
    assert json.loads(enc.encode({"index": 0})) == {"text": "x", "output_ids": [7, 8],
                                                    "index": 0}


def _delta(index: int, text: str, ids: list[int], done: bool = False,
           last: bool = False) -> Delta:
    """Choice `index`'s delta; `done`: the choice's last, `last`: the prompt's last."""
    c = ChoiceDelta(index, text, ids, None, "stop" if done else None, None)
    return Delta(0, 3, 0, [c], last)


def test_queued_deltas_fold_into_one_event_per_changed_choice():
    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        group = RequestGroup(loop, "g", [[1, 2, 3]], SamplingParams(n=2), 0.0,
                             lambda g, abort: None)
        seen: list[int] = []

        def rest(i: int) -> dict:
            return {"folded": len(seen), "index": i}

        events = cumulative_events(group, 2, lambda d: seen.append(len(d.choices)), rest)
        # Three deltas already queued: one event per changed choice, after all three.
        for d in (_delta(0, "a\"", [5]), _delta(1, "x", [9]), _delta(0, "é", [6])):
            group._queue.put_nowait(d)
        out = [json.loads(await anext(events)) for _ in range(2)]
        # Nothing else queued: each delta is its own event.
        group._queue.put_nowait(_delta(1, "y", [10], done=True))
        out.append(json.loads(await anext(events)))
        group._queue.put_nowait(_delta(0, "!", [7], done=True, last=True))
        out += [json.loads(e) async for e in events]
        return out

    assert asyncio.run(main()) == [
        {"text": 'a"é', "output_ids": [5, 6], "folded": 3, "index": 0},
        {"text": "x", "output_ids": [9], "folded": 3, "index": 1},
        {"text": "xy", "output_ids": [9, 10], "folded": 4, "index": 1},
        {"text": 'a"é!', "output_ids": [5, 6, 7], "folded": 5, "index": 0},
    ]
