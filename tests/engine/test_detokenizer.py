"""Incremental detokenizer: streamed text equals a full decode, stop strings never leak.

Tokenizers: the default model's (SmolLM2, byte-level BPE) and a tiny Llama-style sentencepiece
tokenizer with byte fallback built here.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

WORDS = ["hello", "world", "the", "stop", "end", "you"]
CJK = "你好世界中文字"


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style: '▁' for spaces, BPE over characters, unknown characters as <0xNN> bytes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = []
    for piece in "▁abcdefghijklmnopqrstuvwxyz.,!é你好":
        vocab[piece] = len(vocab)
    for word in WORDS:  # merge '▁' + letters into '▁hello', '▁world', ...
        prev = "▁"
        for ch in word:
            merges.append((prev, ch))
            prev += ch
            vocab.setdefault(prev, len(vocab))
    merges.append(("你", "好"))
    vocab["你好"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["smollm2", "byte_fallback"])
def tokenizer(request):
    if request.param == "byte_fallback":
        return byte_fallback_tokenizer()
    try:
        return request.getfixturevalue("default_tokenizer")
    except pytest.FixtureLookupError:
        p = request.getfixturevalue("default_gguf")
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_byte_fallback_tokenizer_really_falls_back():
    tok = byte_fallback_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok.encode("hello 🎉 你好", add_special_tokens=False))
    assert pieces == ["▁hello", "▁", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>", "▁", "你好"]
    assert tok.decode(tok.encode("hello 🎉 你好", add_special_tokens=False)) == "hello 🎉 你好"


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decode(tok, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(tok, prompt: list[int], ids: list[int], **kw):
    """Feed ids one at a time; return (chunks with finish() last, the detokenizer)."""
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    chunks = [detok.add([i]) for i in ids]
    chunks.append(detok.finish())
    assert "".join(chunks) == detok.text
    return chunks, detok


texts = st.lists(
    st.sampled_from(
        list("abcdefghij XYZ .,!\n") + WORDS + list(CJK) + list("éüñçàØ")
        + ["🎉", "😀", "👍🏽", "🇯🇵", "e\u0301", "\u200d"]
    ),
    max_size=40,
).map("".join)
FAST = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FAST
@given(text=texts)
def test_streamed_text_equals_full_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    chunks, detok = stream(tokenizer, [], ids)
    assert "".join(chunks) == decode(tokenizer, ids)
    assert not any("\ufffd" in c for c in chunks), chunks
    assert detok.stopped is None


_SHARED_TEXTS: dict[int, dict[int, str]] = {}  # id(tokenizer) -> one-token decodes


@FAST
@given(prompt=texts, text=texts)
def test_shared_one_token_decodes_change_nothing(tokenizer, prompt, text):
    # The engine shares decode([id]) among its detokenizers (token_texts): kept across
    # examples here, the stream must be what a detokenizer of its own gives.
    p_ids, ids = encode(tokenizer, "Q: " + prompt), encode(tokenizer, text)
    shared = _SHARED_TEXTS.setdefault(id(tokenizer), {})
    assert stream(tokenizer, p_ids, ids, token_texts=shared)[0] == stream(tokenizer, p_ids, ids)[0]


@FAST
@given(prompt=texts, text=texts)
def test_prompt_is_context_not_output(tokenizer, prompt, text):
    prompt = "Q: " + prompt + " A:"
    p_ids, ids = encode(tokenizer, prompt), encode(tokenizer, text)
    chunks, _ = stream(tokenizer, p_ids, ids)
    whole = decode(tokenizer, p_ids + ids)
    assert whole.startswith(decode(tokenizer, p_ids))
    assert "".join(chunks) == whole[len(decode(tokenizer, p_ids)) :]


@FAST
@given(data=st.data())
def test_random_token_ids_match_full_decode(tokenizer, data):
    # Arbitrary ids include broken UTF-8. Byte-level decoding replaces only the bad bytes, so the
    # stream equals the full decode. Sentencepiece's ByteFallback turns a whole run of byte
    # tokens into U+FFFDs if any byte is bad, which no stream can know in advance: for it the
    # ids are the non-byte tokens (whole characters made of byte tokens are checked above).
    # An incomplete character at the end is dropped, so the stream may lack trailing U+FFFDs.
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=30))
    if "<0x00>" in tokenizer.get_vocab():
        ids = [i for i in ids if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    chunks, _ = stream(tokenizer, [], ids)
    assert "".join(chunks) == decode(tokenizer, ids).rstrip("\ufffd")


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = encode(tokenizer, "a🎉")
    assert len(ids) >= 3  # the emoji spans several tokens
    chunks, _ = stream(tokenizer, [], ids)
    assert [c for c in chunks if c] == ["a", "🎉"]


def test_a_character_cut_at_the_end_is_dropped(tokenizer):
    # A length stop inside the emoji: neither a chunk nor the whole text ends in U+FFFD.
    ids = encode(tokenizer, "a🎉")
    cuts = [c for c in range(len(ids)) if decode(tokenizer, ids[:c]).endswith("\ufffd")]
    assert len(cuts) >= 2  # where a plain decode ends in U+FFFD
    for cut in cuts:
        chunks, detok = stream(tokenizer, [], ids[:cut])
        assert "\ufffd" not in detok.text
        assert detok.text == decode(tokenizer, ids[:cut]).rstrip("\ufffd")


def check_stop(tok, text: str, stop: list[str], expect: str, include: bool, **kw) -> None:
    """Stream `text`; no emitted chunk may reveal any stop string's start before it resolves."""
    ids = encode(tok, text)
    stops = any(s in text for s in stop)
    detok = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include, **kw)
    emitted = ""
    for i in ids:
        emitted += detok.add([i])
        if detok.stopped is None:
            # Whatever was emitted is final: it cannot end with the start of a stop string.
            assert not any(s[:n] and emitted.endswith(s[:n])
                           for s in stop for n in range(1, len(s))), emitted
            assert not any(s in emitted for s in stop)
    assert (detok.stopped is not None) is stops
    if stops:
        assert detok.add(encode(tok, " more")) == ""  # nothing after the stop string
    emitted += detok.finish()
    assert emitted == expect == detok.text
    with pytest.raises(RuntimeError):
        detok.add(encode(tok, " more"))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include):
    text = "hello world, the end you see"
    stop = ["d, the e", "xyz"]
    assert len(encode(tokenizer, "d, the e")) > 1  # the stop string spans tokens
    expect = "hello world, the e" if include else "hello worl"
    check_stop(tokenizer, text, stop, expect, include)


@pytest.mark.parametrize("include", [False, True])
def test_earliest_stop_wins_and_multibyte_stop(tokenizer, include):
    text = "hello 你好 world 🎉 end"
    check_stop(tokenizer, text, ["world", "好 w"], "hello 你" + ("好 w" if include else ""),
               include)
    check_stop(tokenizer, text, ["🎉"], "hello 你好 world " + ("🎉" if include else ""), include)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_count_only_after_min_tokens(tokenizer, include):
    text = "hello world, hello world, the end"
    ids = encode(tokenizer, text)
    m = len(encode(tokenizer, "hello world"))
    assert decode(tokenizer, ids[:m]) == "hello world"  # the first "world" ends in token m
    kw = dict(stop=["world"], include_stop_str_in_output=include)
    tail = "world" if include else ""
    _, detok = stream(tokenizer, [], ids, min_tokens=m, **kw)  # the second "world" stops
    assert (detok.stopped, detok.text) == ("world", "hello world, hello " + tail)
    _, detok = stream(tokenizer, [], ids, min_tokens=m - 1, **kw)  # the first one does
    assert (detok.stopped, detok.text) == ("world", "hello " + tail)
    _, detok = stream(tokenizer, [], ids, min_tokens=len(ids), **kw)  # none: all text
    assert (detok.stopped, detok.text) == (None, text)
    # A match may start in the first min_tokens' text when it ends after it.
    _, detok = stream(tokenizer, [], ids, min_tokens=m, stop=["world, hello"])
    assert (detok.stopped, detok.text) == ("world, hello", "hello ")


def test_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    # "the e" starts like the stop string "the end" but is not it: released later or at finish.
    check_stop(tokenizer, "the e the enx", ["the end"], "the e the enx", False)
    check_stop(tokenizer, "hello the en", ["the end"], "hello the en", False)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    hello, world = encode(tokenizer, "hello"), encode(tokenizer, " world")
    ids = hello + [eos] + world
    chunks, _ = stream(tokenizer, [], ids, skip_special_tokens=skip)
    got = "".join(chunks)
    assert got == decode(tokenizer, ids, skip)
    assert (tokenizer.eos_token in got) is not skip
    # A stop string can match the special token's text only when it is shown.
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip,
                                   stop=[tokenizer.eos_token])
    detok.add(ids)
    detok.finish()
    assert (detok.stopped is None) is skip
    assert detok.text == (decode(tokenizer, hello + world) if skip else "hello")


class CountingTokenizer:
    """Records the number of ids in each decode call."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_decode_window_stays_small(tokenizer):
    # Per-token work must not grow with the output: each decode sees a few recent tokens.
    prompt, ids = encode(tokenizer, "prompt " * 100), encode(tokenizer, "hello world 你好 🎉" * 50)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, prompt)
    for i in ids:
        detok.add([i])
    whole = decode(tokenizer, prompt + ids)
    assert detok.text + detok.finish() == whole[len(decode(tokenizer, prompt)) :]
    assert len(counting.sizes) <= 2 * len(ids) + 2
    assert max(counting.sizes) <= 8, max(counting.sizes)


def test_a_tokenizer_that_overrides_decode_is_honoured():
    # The detokenizer calls the Rust decode directly only where transformers' decode is exactly
    # that call; a subclass with its own _decode must still be used.
    class Shouting(type(byte_fallback_tokenizer())):
        def _decode(self, token_ids, **kw):
            return super()._decode(token_ids, **kw).upper()

    tok = byte_fallback_tokenizer()
    tok.__class__ = Shouting
    ids = encode(tok, "hello world")
    chunks, _ = stream(tok, [], ids)
    assert "".join(chunks) == "HELLO WORLD"
