"""Strict JSON schemas: an object that names its properties allows no others by default."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams
from engine.structured.schema import strict_schema

jsonschema = pytest.importorskip("jsonschema")

POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
NESTED = {
    "type": "object",
    "properties": {"p": POINT, "list": {"type": "array", "items": POINT},
                   "either": {"anyOf": [POINT, {"type": "string"}]},
                   "ref": {"$ref": "#/$defs/pt"}},
    "$defs": {"pt": POINT},
}


def valid(schema: dict, doc: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(doc)


@pytest.mark.parametrize("doc", [
    {"z": 1},
    {"p": {"x": 1, "z": 2}},
    {"list": [{"x": 1}, {"y": 2, "extra": 0}]},
    {"either": {"x": 1, "w": 0}},
    {"ref": {"x": 1, "q": 3}},
])
def test_unnamed_properties_are_forbidden_at_every_depth(doc) -> None:
    assert valid(NESTED, doc)  # JSON Schema's default allows them
    assert not valid(strict_schema(NESTED), doc)


def test_named_properties_still_validate_and_the_input_is_not_changed() -> None:
    before = json.dumps(NESTED)
    strict = strict_schema(NESTED)
    doc = {"p": {"x": 1}, "list": [{"y": 2}], "either": "s", "ref": {"x": 0, "y": 0}}
    assert valid(strict, doc)
    assert json.dumps(NESTED) == before
    assert list(strict["properties"]) == ["p", "list", "either", "ref"]  # order kept


def test_what_the_schema_says_is_kept() -> None:
    open_ = {"type": "object", "properties": {"a": {"type": "string"}},
             "additionalProperties": True}
    typed = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}
    assert valid(strict_schema(open_), {"a": "x", "b": 1})
    assert valid(strict_schema(typed), {"b": 1}) and not valid(strict_schema(typed), {"b": "s"})
    assert valid(strict_schema({"type": "object"}), {"any": 1})  # json_object: any object
    # allOf branches are merged, so a branch naming one property does not forbid the other's.
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                      {"type": "object", "properties": {"b": {"type": "integer"}}}]}
    assert valid(strict_schema(both), {"a": 1, "b": 2})


def test_sampled_outputs_add_no_unnamed_fields(default_llm: LLM) -> None:
    # Sampled (not greedy), the default model adds fields the schema does not name when it may.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}}
    params = SamplingParams(max_tokens=80, temperature=0.7, seed=7, n=8, json_schema=schema)
    out = default_llm.chat([[{"role": "user", "content": "Describe a person as JSON."}]],
                           [params])[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        assert set(json.loads(c.text)) <= {"name", "age"}, c.text
