"""JSON schemas made strict: an object that names its properties allows no others.

JSON Schema's default lets an object carry properties its schema does not name; a sampled
model then tends to add fields until max_tokens cuts the JSON. OpenAI's structured outputs
and XGrammar's default (strict mode) forbid unnamed properties, and so do we: every object
schema with `properties` and neither `additionalProperties` nor `unevaluatedProperties` gets
`additionalProperties: false`. A schema that says either keeps what it says, and an object
without `properties` (`{"type": "object"}`, any object) is left open.
"""

from __future__ import annotations

from typing import Any

_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else",
              "additionalProperties", "unevaluatedItems", "propertyNames")
"""Keywords whose value is one schema."""
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
"""Keywords whose value is a list of schemas (allOf is handled apart)."""
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
"""Keywords whose value maps names to schemas."""


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` where objects with named properties allow no others."""
    return _walk(schema, close=True)


def _walk(node: Any, close: bool) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)  # key order kept: properties are generated in the schema's order
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _walk(out[key], True)
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_walk(s, True) for s in out[key]]
    # allOf branches are merged: each may name only some of the properties, so a branch is
    # not closed on its own (its nested schemas still are).
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_walk(s, False) for s in out["allOf"]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _walk(s, True) for name, s in out[key].items()}
    if (close and isinstance(out.get("properties"), dict) and "additionalProperties" not in out
            and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out
