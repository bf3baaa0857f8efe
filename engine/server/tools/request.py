"""A chat request's tools: validated `tools`, `tool_choice` and `parallel_tool_calls`, the
schema that enforces `required` and named choices, and what the chat template gets.

`required` and a named function are enforced with the structured-output engine, so any model
returns a valid call: a named function's output is its arguments object (its parameter
schema is the constraint), `required`'s is a JSON list of {"name", "parameters"} objects, one
branch per function (the format of vLLM's enforced calls). JSON schemas are strict
(engine.structured.schema), so arguments carry only the parameters the function names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from engine.server.protocol import ApiError
from engine.server.tools.parsers import ToolCall, call_id, calls_from, json_values

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Function names OpenAI accepts."""
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "}}
"""llguidance's JSON options for enforced calls: fixed separators and no other whitespace,
which a model not trained for tools would otherwise repeat until max_tokens."""


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict[str, Any], ...]
    """The functions as OpenAI's tool objects (what HF chat templates take as `tools=`)."""
    choice: str
    """auto, none, required, or function (the one named by `named`)."""
    named: str | None
    parallel: bool

    @classmethod
    def parse(cls, tools: list[Any] | None, tool_choice: Any,
              parallel_tool_calls: bool | None) -> ToolRequest | None:
        """None when the request has no tools (and asks for none)."""
        choice, named = _choice(tool_choice)
        if not tools:
            if choice in ("required", "function"):
                raise ApiError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
            return None
        checked = tuple(_tool(t, i) for i, t in enumerate(tools))
        names = [t["function"]["name"] for t in checked]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ApiError(400, f"tools name {sorted(dup)} more than once", "tools")
        if named is not None and named not in names:
            raise ApiError(400, f"tool_choice names {named!r}, which is not among the tools "
                           f"{names}", "tool_choice")
        return cls(checked, choice or "auto", named, parallel_tool_calls is not False)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def parameters(self, name: str) -> dict[str, Any]:
        return next(t["function"]["parameters"] for t in self.tools
                    if t["function"]["name"] == name)

    def forced_schema(self) -> dict[str, Any] | None:
        """The constraint of a required or named choice, None otherwise."""
        if self.choice == "function":
            return {**self.parameters(self.named or ""), **COMPACT}
        if self.choice != "required":
            return None
        branches = [{"type": "object",
                     "properties": {"name": {"const": t["function"]["name"]},
                                    "parameters": t["function"]["parameters"]},
                     "required": ["name", "parameters"]} for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": {"anyOf": branches}}
        if not self.parallel:
            schema["maxItems"] = 1
        return {**schema, **COMPACT}

    def parse_forced(self, text: str) -> list[ToolCall]:
        """The calls of an enforced output ([] when it was cut before it completed)."""
        if self.choice == "function":
            values = json_values(text)
            if values and len(values) == 1 and isinstance(values[0], dict):
                return [ToolCall(self.named or "", json.dumps(values[0], ensure_ascii=False),
                                 call_id())]
            return []
        return calls_from(json_values(text)) or []


def _choice(tool_choice: Any) -> tuple[str | None, str | None]:
    if tool_choice is None:
        return None, None
    if tool_choice in ("auto", "none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return "function", fn["name"]
    raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or "
                   "{'type': 'function', 'function': {'name': ...}}, got "
                   f"{json.dumps(tool_choice)[:200]}", "tool_choice")


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools.{i}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}",
                       where)
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or not NAME.fullmatch(fn["name"]):
        raise ApiError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '.' or "
                       f"'-', got {fn.get('name') if isinstance(fn, dict) else fn!r}",
                       f"{where}.function.name")
    params = fn.get("parameters", EMPTY_PARAMETERS)
    _check_schema(params, f"{where}.function.parameters")
    out = {k: v for k, v in fn.items() if k in ("name", "description", "strict")}
    return {"type": "function", "function": {**out, "parameters": params}}


def _check_schema(node: Any, where: str) -> None:
    """The parts of a schema we can check without compiling it: what nests and `type`.
    (A required or named choice compiles it too; that error is a 400 as well.)"""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ApiError(400, f"{where} must be a JSON schema (an object), got "
                       f"{json.dumps(node)[:100]}", where)
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    bad = [k for k in kinds if k not in JSON_TYPES]
    if bad:
        raise ApiError(400, f"{where}.type {bad[0]!r} is not a JSON type ({sorted(JSON_TYPES)})",
                       f"{where}.type")
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        sub = node.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ApiError(400, f"{where}.{key} must be an object of schemas", f"{where}.{key}")
        for name, s in sub.items():
            _check_schema(s, f"{where}.{key}.{name}")
    for key in ("items", "additionalProperties", "not"):
        if key in node:
            _check_schema(node[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            if not isinstance(node[key], list):
                raise ApiError(400, f"{where}.{key} must be a list of schemas", f"{where}.{key}")
            for j, s in enumerate(node[key]):
                _check_schema(s, f"{where}.{key}.{j}")
    required = node.get("required")
    if required is not None and (not isinstance(required, list)
                                 or not all(isinstance(r, str) for r in required)):
        raise ApiError(400, f"{where}.required must be a list of property names",
                       f"{where}.required")


def detect_parser(chat_template: str | None) -> str:
    """The tool-call parser a chat template's call format wants (see TOOL_PARSERS)."""
    text = chat_template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3_json"
    return "json"


def template_takes_tools(chat_template: str | None) -> bool:
    return "tools" in (chat_template or "")


def tools_system_text(tools: tuple[dict[str, Any], ...]) -> str:
    """What a model whose template ignores `tools` is told about them (the json parser's
    format)."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return ("You can call these functions:\n" + "\n".join(lines) + "\nTo call one, answer "
            'with only a JSON object {"name": <function name>, "arguments": <arguments>}.')
