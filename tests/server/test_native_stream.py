"""/generate's pre-encoded streaming events equal json.dumps of the cumulative item."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.server.native_stream import CumulativeJson

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
