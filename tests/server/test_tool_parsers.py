"""Tool-call and reasoning parsers on canned model outputs, whole and streamed.

Every case is checked through ChoiceOutput both ways: the whole text at once, and one
character at a time (the worst split a stream can have); both must give the same content,
reasoning and calls, and no streamed piece may show part of a call.
"""

from __future__ import annotations

import json

import pytest

from engine.server.chat_output import ChoiceOutput
from engine.server.cli import REASONING_PARSER_NAMES, TOOL_PARSER_NAMES
from engine.server.protocol import ApiError
from engine.server.reasoning import REASONING_PARSERS
from engine.server.tools import TOOL_PARSERS, ToolRequest, detect_parser

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARIS = ("get_weather", {"city": "Paris"})
UTC = ("get_time", {"tz": "UTC"})


def run(text: str, parser: str | None, reasoning: str | None = None, choice="auto",
        parallel=True, streamed: bool = False) -> tuple[dict, list]:
    tools = ToolRequest.parse(TOOLS, choice, parallel) if parser or choice != "auto" else None
    out = ChoiceOutput(REASONING_PARSERS[reasoning] if reasoning else None, tools,
                       TOOL_PARSERS[parser]() if parser else None)
    pieces = [out.feed(ch) for ch in text] if streamed else [out.feed(text)]
    rest, calls = out.finish()
    fields: dict[str, str] = {}
    for p in [*pieces, rest]:
        for k, v in p.items():
            fields[k] = fields.get(k, "") + v
    return fields, [(c.name, json.loads(c.arguments)) for c in calls]


CASES = [
    # (parser, model output, content, calls)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}\n</tool_call>', "Let me check.", [PARIS]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
     '</tool_call>', "", [PARIS, UTC]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a call.",
     "No tools needed: 2 < 3 and <tool is not a call.", []),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>",
     []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"tz": "UTC"}}', "", [PARIS, UTC]),
    ("llama3_json", "The weather is {unknown}.", "The weather is {unknown}.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"tz": "UTC"}}]', "", [PARIS, UTC]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure.", [PARIS]),
    ("mistral", "[TOOLS are not calls]", "[TOOLS are not calls]", []),
    ("json", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [PARIS]),
    ("json", '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]', "",
     [PARIS]),
    ("json", "Plain answer.", "Plain answer.", []),
]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_auto_parses_each_family(parser, text, content, calls, streamed) -> None:
    fields, got = run(text, parser, streamed=streamed)
    assert got == calls
    assert fields.get("content", "") == content


def test_streamed_content_never_shows_a_call() -> None:
    text = 'Checking.<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    out = ChoiceOutput(None, ToolRequest.parse(TOOLS, "auto", True), TOOL_PARSERS["hermes"]())
    shown = "".join(out.feed(ch).get("content", "") for ch in text)
    assert shown == "Checking."
    assert [c.name for c in out.finish()[1]] == ["get_time"]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>')
    assert run(text, "hermes", parallel=False)[1] == [PARIS]


def test_tool_choice_none_leaves_the_text_alone() -> None:
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert run(text, "hermes", choice="none") == ({"content": text}, [])


@pytest.mark.parametrize("streamed", [False, True])
def test_forced_choices_read_the_enforced_json(streamed) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    assert run('{"tz": "UTC"}', "hermes", choice=named, streamed=streamed) == ({}, [UTC])
    listed = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    assert run(listed, "hermes", choice="required", streamed=streamed) == ({}, [PARIS])
    cut = '[{"name": "get_weather", "param'  # a length stop before the call completed
    assert run(cut, "hermes", choice="required", streamed=streamed) == ({"content": cut}, [])


REASONING = [
    # (parser, output, reasoning, content)
    ("qwen3", "<think>\nThe user greets.\n</think>\n\nHello!", "\nThe user greets.\n", "Hello!"),
    ("qwen3", "Hello! No thinking here.", None, "Hello! No thinking here."),
    ("qwen3", "<think>\nstill thinking when cut", "\nstill thinking when cut", ""),
    ("deepseek_r1", "The user greets.</think>\n\nHello!", "The user greets.", "Hello!"),
    ("deepseek_r1", "<think>x < y</think>ok", "x < y", "ok"),
    ("deepseek_r1", "all reasoning, cut", "all reasoning, cut", ""),
]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), REASONING)
def test_reasoning_parsers(parser, text, reasoning, content, streamed) -> None:
    fields, _ = run(text, None, reasoning=parser, streamed=streamed)
    assert fields.get("reasoning_content") == (reasoning or None)
    assert fields.get("content", "") == content
    assert REASONING_PARSERS[parser].split(text)[1] == content


def test_reasoning_then_a_tool_call() -> None:
    text = ('<think>I need the weather.</think>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>')
    for streamed in (False, True):
        fields, calls = run(text, "hermes", reasoning="qwen3", streamed=streamed)
        assert fields == {"reasoning_content": "I need the weather."} and calls == [PARIS]


def test_parsers_are_chosen_by_the_chat_template() -> None:
    assert detect_parser("{{ '<tool_call>' }}{{ tools }}") == "hermes"
    assert detect_parser("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]") == "mistral"
    assert detect_parser("<|python_tag|>{{ tools }} ipython") == "llama3_json"
    assert detect_parser("{{ messages }}") == "json"
    assert sorted(TOOL_PARSER_NAMES) == sorted(TOOL_PARSERS)
    assert sorted(REASONING_PARSER_NAMES) == sorted(REASONING_PARSERS)


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "obj"}}}], "auto",
     "tools.0.function.parameters.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": 3}}}}], "auto",
     "tools.0.function.parameters.properties.a"),
    ([WEATHER_TOOL, WEATHER_TOOL], "auto", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(tools, choice, param) -> None:
    with pytest.raises(ApiError) as e:
        ToolRequest.parse(tools, choice, None)
    assert e.value.status == 400 and e.value.param == param


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    from engine.server.serving import calls_as_content, with_tools_message

    tools = ToolRequest.parse(TOOLS, "auto", None)
    msgs = with_tools_message([{"role": "user", "content": "Weather?"}], tools)
    assert msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    merged = with_tools_message([{"role": "system", "content": "Be brief."}], tools)
    assert len(merged) == 1 and merged[0]["content"].startswith("Be brief.\n\n")
    # An earlier call, in the json parser's format: what the model would write reads back.
    msg = calls_as_content({"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time",
                                                     "arguments": {"tz": "UTC"}}}]})
    assert run(msg["content"], "json") == ({}, [UTC])
