"""Structured outputs over HTTP, through the real `openai` client, against one server.

Greedy with max_tokens large enough for each grammar to complete (finish_reason "stop").
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.schemas import WEATHER
from tests.server.conftest import MODEL, sse_events

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

ASK_WEATHER = [{"role": "user", "content": "Report the weather in Paris as JSON."}]
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"


def chat(client, messages=ASK_WEATHER, max_tokens: int = 100, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=max_tokens, **kwargs)


def test_response_format_json_schema(client) -> None:
    r = chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": WEATHER, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), WEATHER)


def test_response_format_json_object_streamed(client) -> None:
    ask = "What is the capital of France? Answer in JSON."
    stream = chat(client, [{"role": "user", "content": ask}], max_tokens=60,
                  response_format={"type": "json_object"}, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert isinstance(json.loads(text), dict)


def test_completions_regex_choice_and_guided_alias(client) -> None:
    r = client.completions.create(model=MODEL, prompt="The office phone number is",
                                  max_tokens=30, temperature=0, extra_body={"regex": PHONE})
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(PHONE, r.choices[0].text)
    options = ["red", "green", "blue"]
    for extra in ({"choice": options}, {"guided_choice": options}):
        r = client.completions.create(model=MODEL, prompt="The color of the sky is",
                                      max_tokens=5, temperature=0, extra_body=extra)
        assert r.choices[0].text in options and r.choices[0].finish_reason == "stop"


def test_chat_ebnf(client) -> None:
    ebnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    r = chat(client, [{"role": "user", "content": "What is 7 times 6?"}], max_tokens=20,
             extra_body={"ebnf": ebnf})
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", r.choices[0].message.content)


def test_generate_takes_constraints_in_sampling_params(http: httpx.Client) -> None:
    body = {"text": "Weather report for Paris in JSON:", "sampling_params": {
        "max_new_tokens": 100, "temperature": 0, "json_schema": json.dumps(WEATHER)}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    jsonschema.validate(json.loads(out["text"]), WEATHER)
    body = {"text": "Is Paris in France? Answer:", "stream": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0, "regex": " ?(yes|no)"}}
    with http.stream("POST", "/generate", json=body) as s:
        events = sse_events(s.iter_lines())
    assert re.fullmatch(" ?(yes|no)", events[-1]["text"])
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "stop"


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}),
     "json_schema", "invalid json_schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema", "schema is required"),
    (dict(extra_body={"regex": "[z-a]"}), "regex", "invalid regex"),
    (dict(extra_body={"ebnf": "root ::= nowhere"}), "ebnf", "invalid ebnf"),
    (dict(extra_body={"choice": "yes"}), "choice", "choice"),
    (dict(extra_body={"regex": "a+", "choice": ["a"]}), "choice", "at most one"),
    (dict(response_format={"type": "json_object"}, extra_body={"json_schema": {}}),
     "json_schema", "given twice"),
])
def test_invalid_constraints_are_400_and_the_server_keeps_serving(client, kwargs, param,
                                                                  message) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as e:
        chat(client, max_tokens=4, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    r = chat(client, [{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_guided_aliases_constrain_and_response_format_text_does_not(client) -> None:
    ask = [{"role": "user", "content": "What is 7 times 6?"}]
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    for alias, value, max_tokens in (("guided_regex", PHONE, 30), ("guided_json", answer, 30),
                                     ("guided_grammar", 'root ::= "It is " [0-9]+ "."', 12)):
        r = chat(client, ask, max_tokens=max_tokens, extra_body={alias: value}).choices[0]
        assert r.finish_reason == "stop", (alias, r.message.content)
        if alias == "guided_regex":
            assert re.fullmatch(PHONE, r.message.content)
        elif alias == "guided_json":
            jsonschema.validate(json.loads(r.message.content), answer)
        else:
            assert re.fullmatch(r"It is [0-9]+\.", r.message.content)
    plain = chat(client, ask, max_tokens=12).choices[0]
    text = chat(client, ask, max_tokens=12, response_format={"type": "text"}).choices[0]
    assert (text.message.content, text.finish_reason) == (plain.message.content,
                                                          plain.finish_reason)
    assert not re.fullmatch(r"It is [0-9]+\.", plain.message.content)  # the model's own words
    with pytest.raises(openai.BadRequestError, match="given twice") as e:
        chat(client, ask, max_tokens=4, extra_body={"guided_regex": "a+", "regex": "b+"})
    assert e.value.body["param"] == "regex"
