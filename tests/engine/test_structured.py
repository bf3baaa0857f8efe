"""Structured outputs with the real default model: every constrained output is in its language.

Greedy, so outputs are reproducible; max_tokens is large enough for each grammar to complete,
so a constrained request must end with finish_reason "stop".
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.sampler import SamplingMode, SamplingRow, SamplingTensors, sample, unpack_bitmask
from engine.structured import GrammarCompiler, GrammarSpec, make_backend, mask_words
from tests.schemas import WEATHER

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"], "additionalProperties": False,
}
SHOPPING = {
    "type": "object",
    "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object",
                  "properties": {"fruit": {"enum": ["apple", "banana", "cherry"]},
                                 "count": {"type": "integer", "minimum": 1, "maximum": 12}},
                  "required": ["fruit", "count"], "additionalProperties": False},
    }},
    "required": ["items"], "additionalProperties": False,
}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 2,
        "maxItems": 4}
SCHEMAS = [
    ("Describe a fictional person as JSON.", PERSON),
    ("Write a shopping list of fruit as JSON.", SHOPPING),
    ("Report the weather in Paris as JSON.", WEATHER),
    ("List some tags for a blog post about cooking, as a JSON array.", TAGS),
]
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"


def greedy(max_tokens: int = 120, **constraint) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **constraint)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_json_schema_outputs_parse_and_validate(default_llm: LLM) -> None:
    outs = default_llm.chat([user(q) for q, _ in SCHEMAS],
                            [greedy(json_schema=s) for _, s in SCHEMAS])
    for (_, schema), out in zip(SCHEMAS, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    # Properties come in the schema's order (the key order of the spec is kept).
    assert list(json.loads(outs[0].outputs[0].text)) == ["name", "age", "address"]


def test_json_schema_as_text_and_json_object(default_llm: LLM) -> None:
    outs = default_llm.chat(
        [user("Report the weather in Paris as JSON."),
         user("What is the capital of France? Answer in JSON.")],
        [greedy(json_schema=json.dumps(WEATHER)), greedy(json_schema={"type": "object"})])
    jsonschema.validate(json.loads(outs[0].outputs[0].text), WEATHER)
    c = outs[1].outputs[0]
    assert c.finish_reason == "stop", c.text
    assert isinstance(json.loads(c.text), dict)


def test_regex_choice_and_ebnf(default_llm: LLM) -> None:
    ebnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    lark = 'start: ("yes" | "no") ", because " /[a-z ]{3,20}/ "."'
    outs = default_llm.chat(
        [user("What is the phone number of the office?"), user("Is the sky blue?"),
         user("What is 7 times 6?"), user("Is fire cold?")],
        [greedy(regex=PHONE), greedy(choice=["yes", "no", "maybe"]), greedy(ebnf=ebnf),
         greedy(ebnf=lark)])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert re.fullmatch(PHONE, texts[0])
    assert texts[1] in ("yes", "no", "maybe")
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", texts[2])
    assert re.fullmatch(r"(yes|no), because [a-z ]{3,20}\.", texts[3])


def test_constrained_and_unconstrained_share_a_batch(default_llm: LLM) -> None:
    free = [user("Name three colors."), user("Tell me a story.")]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = default_llm.chat(free, plain)
    mixed = default_llm.chat(
        [free[0], user("Report the weather in Paris as JSON."), free[1], user("Is it day?")],
        [plain, greedy(json_schema=WEATHER), plain,
         SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=3, choice=["day", "night"])])
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == \
        [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), WEATHER)
    assert [c.text in ("day", "night") for c in mixed[3].outputs] == [True] * 3


def test_preemption_keeps_the_grammar_state(default_llm: LLM) -> None:
    prompts = [user(f"Request {i}. " + q) for i, (q, _) in enumerate(SCHEMAS[:3])]
    params = [greedy(json_schema=s) for _, s in SCHEMAS[:3]]
    ample = default_llm.chat(prompts, params)
    # Each request needs ~7 pages of 16 tokens; 12 pages cannot hold three at once.
    tiny = LLM(backend="cpu", max_total_tokens=192, max_running_requests=3,
               chunked_prefill_size=64)
    outs = tiny.chat(prompts, params)
    assert tiny.engine.scheduler.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ample]
    for (_, schema), out in zip(SCHEMAS[:3], outs, strict=True):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize("constraint, match", [
    (dict(json_schema={"type": "foo"}), "invalid json_schema: .*foo"),
    (dict(json_schema={"properties": {"a": {"$ref": "#/nope"}}}), "invalid json_schema"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(regex="a(b"), "invalid regex: .*unclosed group"),
    (dict(ebnf="root ::= missing"), "invalid ebnf: .*missing"),
    (dict(ebnf="start: x"), "invalid ebnf: .*unknown name"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(regex="a", choice=["a"]), "at most one of"),
])
def test_invalid_constraints_raise_value_error(default_llm: LLM, constraint, match) -> None:
    with pytest.raises(ValueError, match=match):
        default_llm.generate("Hello", greedy(**constraint))
    assert not default_llm.engine.has_unfinished()


def test_compiled_grammars_are_cached_and_matchers_are_not(default_llm: LLM) -> None:
    compiler = default_llm.engine.grammar_compiler()
    spec = SamplingParams(json_schema=WEATHER).grammar
    assert compiler.compile(spec) is compiler.compile(GrammarSpec(spec.kind, spec.text))
    a, b = compiler.matcher(spec), compiler.matcher(spec)
    tok = default_llm.tokenizer.encode("{", add_special_tokens=False)[0]
    assert a.accept(tok)
    row_a, row_b = (np.zeros(compiler.backend.mask_words, np.int32) for _ in range(2))
    a.fill_mask(row_a)
    b.fill_mask(row_b)
    assert not np.array_equal(row_a, row_b)  # b is still at the start: only '{' fits


def test_tokens_past_the_tokenizer_vocab_are_never_allowed(default_tokenizer) -> None:
    n = len(default_tokenizer)
    backend = make_backend("llguidance", default_tokenizer, n + 100, [2])
    assert backend.mask_words == mask_words(n + 100)
    m = GrammarCompiler(backend).matcher(GrammarSpec("regex", "[a-z ]+"))
    bitmask = np.zeros((2, backend.mask_words), np.int32)
    backend.fill_masks([(m, 1)], bitmask)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [2, 32W]
    assert allowed[0].sum() == 0  # rows not named are untouched
    assert allowed[1, :n].sum() > 100 and allowed[1, n:].sum() == 0


def test_sampler_applies_the_bitmask() -> None:
    rng = np.random.default_rng(0)
    S, V = 4, 70  # V is not a multiple of 32
    logits = rng.normal(size=(S, V)).astype(np.float32)
    allowed = rng.random((S, V)) < 0.2
    allowed[0] = True  # an unconstrained row
    allowed[:, 0] = True  # no row is empty
    words = np.zeros((S, mask_words(V) * 32), np.uint8)
    words[:, :V] = allowed
    bitmask = np.packbits(words, axis=1, bitorder="little").view(np.int32)  # [S, W]
    assert np.array_equal(np.asarray(unpack_bitmask(jnp.asarray(bitmask), V)), allowed)
    wide = np.asarray(unpack_bitmask(jnp.asarray(bitmask[:, :1]), V))  # mask narrower than V
    assert not wide[:, 32:].any()
    rows = [SamplingRow(SamplingParams(temperature=t), seed=i, step=0)
            for i, t in enumerate([0.0, 0.0, 1.0, 2.0])]
    st = SamplingTensors.from_rows(rows, V, pad_to=S)
    out = sample(jnp.asarray(logits), st, SamplingMode.from_rows(rows), jnp.asarray(bitmask))
    tokens = np.asarray(out.tokens)
    assert all(allowed[i, t] for i, t in enumerate(tokens))
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] == np.where(allowed[1], logits[1], -np.inf).argmax()
    # Logprobs stay the model's own: the raw log-softmax, before the mask.
    raw = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(S), tokens], rtol=1e-5)
