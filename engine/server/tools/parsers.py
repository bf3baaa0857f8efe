"""Tool-call parsers: a model family's tool-call text -> (content, calls).

Each parser knows where a call may start (`markers` anywhere in the output, `leading` only at
its start, after whitespace): the streaming splitter emits content up to there and holds the
rest until the end, when `parse` reads the calls. Output that does not parse as calls is
content, never an error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from typing import Any

_DECODER = json.JSONDecoder()


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text (an object)."""
    id: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def short_call_id() -> str:
    """Mistral's templates want 9 alphanumeric characters."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def json_values(text: str) -> list[Any] | None:
    """The JSON values `text` is made of (separated by whitespace, ',' or ';'), or None."""
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def to_call(obj: Any, make_id: Any = call_id) -> ToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} as a call, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), make_id())


def calls_from(values: list[Any] | None, make_id: Any = call_id) -> list[ToolCall] | None:
    """Every value (or every item of a list value) as a call, or None if any is not one."""
    if not values:
        return None
    items = [x for v in values for x in (v if isinstance(v, list) else [v])]
    calls = [to_call(x, make_id) for x in items]
    return None if not calls or None in calls else calls  # type: ignore[return-value]


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()
    """Text that starts the calls wherever it appears."""
    leading: tuple[str, ...] = ()
    """Text that starts the calls only at the start of the output."""
    skip_special_tokens = True
    """False where the call marker is a special token the text must keep."""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls); calls empty when the text holds none."""
        raise NotImplementedError


class JsonToolParser(ToolParser):
    """Generic: the output is one call object {"name", "arguments"}, several, or a list."""

    name = "json"
    leading = ("{", "[")

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = calls_from(json_values(text.strip()))
        return ("", calls) if calls else (text, [])


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2/3.3: `<|python_tag|>` (a special token, often skipped) then one or more
    {"name": ..., "parameters": {...}} objects separated by ';'."""

    name = "llama3_json"
    leading = ("{", "<|python_tag|>")

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>")
        calls = calls_from(json_values(body))
        return ("", calls) if calls else (text, [])


class HermesToolParser(ToolParser):
    """Hermes, Qwen2.5, Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call; text before the first block is content."""

    name = "hermes"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        values: list[Any] = []
        for block in self._BLOCK.findall(text[start:]):
            got = json_values(block.strip())
            if got is None:
                return text, []
            values += got
        calls = calls_from(values)
        return (text[:start].rstrip(), calls) if calls else (text, [])


class MistralToolParser(ToolParser):
    """Mistral: `[TOOL_CALLS]` (a special token, kept) then a JSON list of calls, or (v11+
    tokenizers) `name[ARGS]{...}` per call."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    leading = ('[{"name"',)
    skip_special_tokens = False
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*\[ARGS\]")

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        start = text.find("[TOOL_CALLS]")
        content, body = (text[:start], text[start:]) if start >= 0 else ("", text)
        parts = [p for p in body.split("[TOOL_CALLS]") if p.strip()]
        calls: list[ToolCall] | None = []
        for part in parts:
            m = self._NAMED.match(part)
            if m:  # name[ARGS]{...}
                args = json_values(part[m.end():])
                got = calls_from([{"name": m.group(1), "arguments": a} for a in args or []]
                                 or None, short_call_id)
            else:
                got = calls_from(json_values(part.strip()), short_call_id)
            if not got:
                calls = None
                break
            calls += got
        return (content.rstrip(), calls) if calls else (text, [])


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (JsonToolParser, Llama3JsonToolParser, HermesToolParser,
                        MistralToolParser)
}
"""--tool-call-parser name -> parser."""
