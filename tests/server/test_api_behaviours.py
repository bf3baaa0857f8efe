"""What a vLLM/SGLang user relies on beyond the happy path, against one real server.

The server has a small KV pool (32 pages of 16 tokens, so a 512-token context) and takes
4 running + 2 queued sequences, so that capacity and preemption are reachable in seconds.
Tests run in order; each leaves the engine idle.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import (
    ABORTS,
    API_KEY,
    MODEL,
    SMALL,
    ServerProcess,
    metrics,
    running_server,
    sse_events,
    wait_idle,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

PAGE, POOL_PAGES = 16, 32
RUNNING, QUEUED = 4, 2
CHAT = [{"role": "user", "content": "Tell me about the sea."}]
IM_START, IM_END = 1, 2
"""SmolLM2's special tokens `<|im_start|>` and `<|im_end|>` (its EOS)."""
SUCCESS = "engine:request_success_total{finished_reason=\"%s\"}"


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*SMALL, "--api-key", API_KEY, "--page-size", str(PAGE),
            "--max-total-tokens", str(PAGE * POOL_PAGES), "--max-running-requests",
            str(RUNNING), "--max-queued-requests", str(QUEUED)]
    with running_server(tmp_path_factory.mktemp("behaviours"), args) as s:
        yield s


@contextlib.contextmanager
def streaming(http: httpx.Client, path: str, body: dict) -> Iterator[tuple[dict, Iterator]]:
    """An open SSE response: its first event and the iterator over the remaining lines."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        yield json.loads(next(line for line in lines if line.startswith("data: "))[6:]), lines


def finishes(events: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events:
        for c in e["choices"]:
            if c["finish_reason"]:
                out.setdefault(c["index"], []).append(c["finish_reason"])
    return out


LONG = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
"""A completion that runs until it is aborted or its stream is closed."""


def test_model_card_and_unknown_model_is_404(client) -> None:
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.to_dict()["max_model_len"] == PAGE * POOL_PAGES
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-nope")
    assert e.value.code == "model_not_found" and "gpt-nope" in e.value.message


def test_n_above_the_limit_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:  # 128 is OpenAI's limit
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, n=129)
    assert e.value.param == "n" and "at most 128" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, n=129)
    assert e.value.param == "n" and "at most 128" in e.value.message


def test_capacity_counts_n_times_prompts(http, client) -> None:
    capacity = RUNNING + QUEUED
    fits = client.completions.create(model=MODEL, prompt=["Hi", "Yo"], n=3, max_tokens=1)
    assert sorted(c.index for c in fits.choices) == list(range(capacity))  # 2 x 3: exactly full
    with pytest.raises(openai.BadRequestError) as e:  # 2 x 4 could never be taken: not a 503
        client.completions.create(model=MODEL, prompt=["Hi", "Yo"], n=4, max_tokens=1)
    assert e.value.param == "n" and "8 sequences" in e.value.message
    assert f"at most {capacity}" in e.value.message
    opened = []
    try:
        with ThreadPoolExecutor(RUNNING) as pool:  # 4 of the 6 slots taken
            opened = list(pool.map(lambda _: http.send(http.build_request(
                "POST", "/v1/completions", json={**LONG, "stream": True}), stream=True),
                range(RUNNING)))
        assert [r.status_code for r in opened] == [200] * RUNNING
        # 2 prompts x n=2 is 4 more: over; counting either factor alone (2) would fit.
        r = http.post("/v1/completions", json={**LONG, "prompt": ["Hi", "Yo"], "n": 2})
        assert r.status_code == 503 and "capacity" in r.json()["error"]["message"]
    finally:
        for r in opened:
            r.close()
    wait_idle(http)


def test_abort_request_ends_every_choice_of_an_n2_group(http) -> None:
    aborts = wait_idle(http).get(ABORTS, 0)
    body = {"model": MODEL, "messages": CHAT, "n": 2, "max_tokens": 400, "ignore_eos": True}
    with streaming(http, "/v1/chat/completions", body) as (first, lines):
        assert http.post("/abort_request", json={"rid": first["id"]}).status_code == 200
        events = sse_events(lines)
    assert finishes(events) == {0: ["abort"], 1: ["abort"]}
    assert wait_idle(http)[ABORTS] - aborts == 2


def test_abort_request_with_an_unknown_or_missing_rid(http) -> None:
    body = {**LONG, "max_tokens": 16, "stream_options": {"include_usage": True}}
    with streaming(http, "/v1/completions", body) as (_, lines):
        r = http.post("/abort_request", json={"rid": "cmpl-unknown"})
        assert r.status_code == 200 and r.json() == {"rid": "cmpl-unknown"}  # a no-op
        for bad in ({}, {"rid": 7}, {"request": "x"}):
            r = http.post("/abort_request", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "rid"
        events = sse_events(lines)
    assert finishes(events) == {0: ["length"]}  # the running request was not touched
    assert events[-1]["usage"]["completion_tokens"] == 16


def test_duplicate_request_id_is_400_and_the_first_runs_on(http) -> None:
    sp = {"max_new_tokens": 30, "ignore_eos": True, "temperature": 0}
    first_body = {"text": "Count to ten:", "sampling_params": sp, "rid": "dup"}
    again = {"text": "Hi", "sampling_params": {"max_new_tokens": 2}, "rid": "dup"}
    with streaming(http, "/generate", first_body) as (_, lines):
        r = http.post("/generate", json=again)
        assert r.status_code == 400 and "already in use" in r.json()["error"]["message"]
        events = [json.loads(line[6:]) for line in lines
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[-1]["meta_info"]["id"] == "dup"
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 30}
    r = http.post("/generate", json=again)  # finished: the id is free again
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "dup"


def test_flush_cache_is_refused_while_a_request_runs(http) -> None:
    with streaming(http, "/v1/completions", LONG) as (first, lines):
        r = http.post("/flush_cache")
        assert r.status_code == 400 and "running" in r.json()["error"]["message"]
        http.post("/abort_request", json={"rid": first["id"]})
        sse_events(lines)
    wait_idle(http)
    assert http.post("/flush_cache").json() == {"flushed": True}


def test_include_stop_str_in_output_and_skip_special_tokens(client) -> None:
    kw = dict(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    base = client.completions.create(**kw).choices[0].text
    stop = base.split()[2]
    end = base.index(stop) + len(stop)
    keep = {"include_stop_str_in_output": True}
    kept = client.completions.create(**kw, stop=[stop], extra_body=keep).choices[0]
    assert kept.finish_reason == "stop" and kept.text == base[:end]
    streamed = client.completions.create(**kw, stop=[stop], extra_body=keep, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == base[:end]

    # <|im_start|> forced three times: shown only with skip_special_tokens false.
    forced = dict(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                  logit_bias={str(IM_START): 100})
    shown = client.chat.completions.create(**forced, extra_body={"skip_special_tokens": False})
    assert shown.choices[0].message.content == "<|im_start|>" * 3
    hidden = client.chat.completions.create(**forced)
    assert hidden.choices[0].message.content == ""
    assert hidden.usage.completion_tokens == shown.usage.completion_tokens == 3


def test_min_tokens_bans_stop_token_ids_and_eos(http, client) -> None:
    def generate(token: int, **sp) -> dict:
        body = {"text": "The sky is", "sampling_params": {
            "max_new_tokens": 10, "temperature": 0, "logit_bias": {str(token): 100}, **sp}}
        return http.post("/generate", json=body).json()

    stop_id = 9805  # " yes", forced by the bias and given as a stop token
    for token, sp in ((stop_id, {"stop_token_ids": [stop_id]}), (IM_END, {})):
        assert generate(token, **sp)["output_ids"] == [token]
        out = generate(token, min_new_tokens=3, **sp)
        assert len(out["output_ids"]) == 4 and token not in out["output_ids"][:3]
        assert out["output_ids"][3] == token
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=10,
                                  temperature=0, logit_bias={str(stop_id): 100},
                                  extra_body={"stop_token_ids": [stop_id], "min_tokens": 5})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6


def test_completion_top_logprobs_and_text_offset(client) -> None:
    kw = dict(model=MODEL, prompt=["The sky is", "Once upon a time"], max_tokens=6,
              temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    for c in full.choices:
        lp = c.logprobs
        assert len(lp.tokens) == 6 and "".join(lp.tokens) == c.text
        # Each token's offset is where it starts in the completion's text.
        assert lp.text_offset == [0, *itertools.accumulate(len(t) for t in lp.tokens[:-1])]
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                       strict=True):
            assert len(top) == 3 and all(v <= 0 for v in top.values())
            assert top[token] == pytest.approx(logprob)  # greedy: the chosen is the best
            assert max(top.values()) == pytest.approx(logprob)
    tokens, offsets = {0: [], 1: []}, {0: [], 1: []}
    for chunk in client.completions.create(**kw, stream=True):  # offsets run on across chunks
        for c in chunk.choices:
            tokens[c.index] += c.logprobs.tokens
            offsets[c.index] += c.logprobs.text_offset
    assert tokens == {c.index: c.logprobs.tokens for c in full.choices}
    assert offsets == {c.index: c.logprobs.text_offset for c in full.choices}


def test_metric_values_after_a_known_workload(http, client) -> None:
    wait_idle(http)
    assert http.post("/flush_cache").status_code == 200
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(100)]
    m0 = metrics(http)
    # The same 100-token prompt twice: the second finds its first 6 full pages (96 tokens;
    # the last prompt token is always computed). One ends by length, one by EOS.
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                  logit_bias={str(IM_END): 100})
    assert (a.choices[0].finish_reason, b.choices[0].finish_reason) == ("length", "stop")
    assert b.usage.prompt_tokens_details.cached_tokens == 96
    m1 = metrics(http)
    d = {k: m1[k] - m0.get(k, 0) for k in m1}
    assert d["engine:prefix_cache_queries_total"] == 200
    assert d["engine:prefix_cache_hits_total"] == 96
    assert m1["engine:prefix_cache_hit_rate"] == pytest.approx(
        m1["engine:prefix_cache_hits_total"] / m1["engine:prefix_cache_queries_total"])
    assert d["engine:prompt_tokens_total"] == 200
    assert d["engine:generation_tokens_total"] == 3
    assert (d[SUCCESS % "length"], d[SUCCESS % "stop"]) == (1, 1)

    # KV usage while a 100-token prompt runs: its pages, and no more than it can hold.
    body = {**LONG, "prompt": [rng.randrange(1000, 40000) for _ in range(100)],
            "stream_options": {"include_usage": True}}
    with streaming(http, "/v1/completions", body) as (first, lines):
        usage = metrics(http)["engine:kv_cache_usage_perc"]
        http.post("/abort_request", json={"rid": first["id"]})
        generated = sse_events(lines)[-1]["usage"]["completion_tokens"]
    assert math.ceil(101 / PAGE) / POOL_PAGES <= usage
    assert usage <= math.ceil((100 + generated) / PAGE) / POOL_PAGES
    m2 = wait_idle(http)  # pages back in the pool (the prefix cache's are free)
    assert m2[SUCCESS % "abort"] - m1.get(SUCCESS % "abort", 0) == 1

    # Two 224-token prompts, 36 tokens each, run together and need 2 x 17 pages of the 32:
    # one is preempted, recomputed later, and both still finish.
    two = [[rng.randrange(1000, 40000) for _ in range(224)] for _ in range(2)]
    r = client.completions.create(model=MODEL, prompt=two, max_tokens=36, timeout=300,
                                  extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in r.choices] == ["length"] * 2
    assert r.usage.completion_tokens == 72
    m3 = wait_idle(http)
    assert m3["engine:num_preemptions_total"] - m2["engine:num_preemptions_total"] >= 1
    assert m3[SUCCESS % "length"] - m2[SUCCESS % "length"] == 2
