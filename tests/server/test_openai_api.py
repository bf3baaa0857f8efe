"""The HTTP API through the real `openai` client (and httpx for raw cases) against one server.

The server runs with --api-key, 8 running + 4 queued sequences, a 4096-token context and a
1 MB body limit (conftest.py). Tests run in order and leave the engine idle.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import ABORTS, API_KEY, CAPACITY, MODEL, metrics, sse_events, wait_idle

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMP_OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
ERROR_KEYS = {"message", "type", "param", "code"}


def succeeds(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")


def test_models_health_and_api_key(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json=COMP_OK, headers=headers)
        assert r.status_code == 401 and set(r.json()["error"]) == ERROR_KEYS
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    succeeds(client)


def test_chat_stream_equals_non_stream(client, default_tokenizer) -> None:
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    text = full.choices[0].message.content
    assert text and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    u, s = full.usage, chunks[-1].usage
    assert (s.prompt_tokens, s.completion_tokens, s.total_tokens) == \
        (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    template = default_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                                     tokenize=False)
    assert u.prompt_tokens == len(default_tokenizer.encode(template, add_special_tokens=False))
    assert 1 <= u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + \
        u.completion_tokens


def test_chat_without_max_tokens_is_not_cut_at_16(client) -> None:
    """A chat answer without max_tokens runs until it ends (here at a stop string, 30-odd
    tokens in), as OpenAI's, vLLM's and SGLang's do; legacy completions keep OpenAI's 16.
    (max_tokens=None runs to the context limit: tests/engine/test_llm.py.)"""
    list_20 = [{"role": "user", "content": "List the numbers from 1 to 20."}]
    with ThreadPoolExecutor(2) as pool:  # one batch
        chat = pool.submit(client.chat.completions.create, model=MODEL, messages=list_20,
                           temperature=0, stop=[" 12"])
        comp = pool.submit(client.completions.create, model=MODEL, prompt="Once upon a time",
                           temperature=0, extra_body={"ignore_eos": True})
    chat, comp = chat.result(), comp.result()
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens > 16
    assert chat.choices[0].message.content.endswith("10, 11,")
    assert (comp.usage.completion_tokens, comp.choices[0].finish_reason) == (16, "length")


def test_chat_stream_n2_one_role_and_one_finish_per_choice(client) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                                 max_completion_tokens=6, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens <= 2 * 6
    texts, roles, finishes = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in chunks:
        for c in chunk.choices:
            if not texts[c.index] and not finishes[c.index]:
                roles[c.index].append(c.delta.role)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    assert all(r[0] == "assistant" for r in roles.values())
    assert all(len(f) == 1 for f in finishes.values())
    assert texts[0] == texts[1] and texts[0]


def test_completions_batch_with_n_stream_and_usage(client, default_tokenizer) -> None:
    prompts = ["The sky is", "Once upon a time"]
    kw = dict(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0, logprobs=0)
    full = client.completions.create(**kw)
    by = {c.index: c for c in full.choices}
    assert sorted(by) == [0, 1, 2, 3]
    assert by[0].text == by[1].text and by[2].text == by[3].text and by[0].text != by[2].text
    assert full.usage.prompt_tokens == sum(len(default_tokenizer.encode(p)) for p in prompts)
    assert full.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in full.choices)
    streamed, finishes, usage = {i: "" for i in by}, {i: [] for i in by}, None
    for chunk in client.completions.create(**kw, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] += c.text
            finishes[c.index] += [c.finish_reason] if c.finish_reason else []
    assert streamed == {i: c.text for i, c in by.items()}
    assert finishes == {i: [c.finish_reason] for i, c in by.items()}
    assert usage.completion_tokens == full.usage.completion_tokens
    ids = client.completions.create(model=MODEL, prompt=default_tokenizer.encode(prompts[0]),
                                    max_tokens=6, temperature=0)
    assert ids.choices[0].text == by[0].text


def test_identical_concurrent_requests_give_identical_text(client) -> None:
    def one(_: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(set(texts)) == 1 and texts[0]


def test_stop_strings_seed_logit_bias_and_logprobs(client, default_tokenizer) -> None:
    kw = dict(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    base = client.completions.create(**kw).choices[0].text
    stop = base.split()[2]
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == base[:base.index(stop)]

    seeded = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0,
                  seed=1234)
    assert client.completions.create(**seeded).choices[0].text == \
        client.completions.create(**seeded).choices[0].text

    paris = default_tokenizer.encode(" Paris")
    assert len(paris) == 1
    forced = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3,
                                       temperature=0, logprobs=0,
                                       logit_bias={str(paris[0]): 100}).choices[0]
    assert forced.logprobs.tokens == [" Paris"] * 3

    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    assert r.choices[0].finish_reason == "length"  # 4 tokens: the answer is longer
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        top = [x.logprob for x in t.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 0
        assert t.token == t.top_logprobs[0].token  # greedy picks the most likely
        assert t.logprob == pytest.approx(top[0])
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_stop_string_waits_for_min_tokens(client) -> None:
    """The "," inside the first 4 tokens does not stop; the next one ends text and tokens."""
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16,
                                  temperature=0, stop=[","], logprobs=0,
                                  extra_body={"min_tokens": 4}).choices[0]
    tokens = r.logprobs.tokens
    assert r.finish_reason == "stop" and len(tokens) > 4
    assert "," in "".join(tokens[:4]) and r.text.startswith("".join(tokens[:4]))
    assert "".join(tokens).startswith(r.text + ",")
    assert "," not in "".join(tokens[:-1])[len("".join(tokens[:4])):]  # the first one after


ERROR_CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": ', 400, None, "not valid JSON"),
    ("body not an object", "/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("temperature", "/v1/chat/completions", {**CHAT_OK, "temperature": 500}, 400,
     "temperature", "temperature"),
    ("top_p", "/v1/completions", {**COMP_OK, "top_p": 0}, 400, "top_p", "top_p"),
    ("n < 1", "/v1/chat/completions", {**CHAT_OK, "n": 0}, 400, "n", "n must be"),
    ("max_tokens < 1", "/v1/completions", {**COMP_OK, "max_tokens": 0}, 400, "max_tokens",
     "max_tokens"),
    ("wrong type", "/v1/completions", {**COMP_OK, "max_tokens": "many"}, 400, "max_tokens", ""),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", ""),
    ("unknown model", "/v1/chat/completions", {**CHAT_OK, "model": "gpt-nope"}, 404, "model",
     "does not exist"),
    ("prompt over context", "/v1/completions", {**COMP_OK, "prompt": [1] * 5000}, 400,
     "prompt", "maximum context length"),
    ("prompt + max_tokens over context", "/v1/completions", {**COMP_OK, "max_tokens": 4096},
     400, "prompt", "maximum context length"),
    ("empty prompt", "/v1/completions", {**COMP_OK, "prompt": ""}, 400, "prompt", "empty"),
    ("no prompt", "/v1/completions", {**COMP_OK, "prompt": []}, 400, "prompt", "empty"),
    ("token outside vocab", "/v1/completions", {**COMP_OK, "prompt": [1, 49152]}, 400,
     "prompt", "vocabulary"),
    ("negative token", "/v1/completions", {**COMP_OK, "prompt": [-1]}, 400, "prompt",
     "vocabulary"),
    ("response_format type", "/v1/chat/completions",
     {**CHAT_OK, "response_format": {"type": "xml"}}, 400, "response_format.type",
     "not supported"),
    ("tools on completions", "/v1/completions",
     {**COMP_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not supported yet"),
    ("invalid regex", "/v1/completions", {**COMP_OK, "regex": "a(b"}, 400, "regex",
     "invalid regex"),
    ("image content", "/v1/chat/completions",
     {**CHAT_OK, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "messages.0.content", "not supported yet"),
    ("top_logprobs alone", "/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("logprobs > 20", "/v1/completions", {**COMP_OK, "logprobs": 21}, 400, "logprobs", ""),
    ("logit_bias outside vocab", "/v1/completions", {**COMP_OK, "logit_bias": {"60000": 5}},
     400, "logit_bias", "vocabulary"),
    ("native unknown parameter", "/generate",
     {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "bogus": 1}}, 400,
     "sampling_params.bogus", "bogus"),
    ("native text and ids", "/generate", {"text": "Hi", "input_ids": [1]}, 400, "text",
     "exactly one"),
    ("payload too large", "/v1/completions", {**COMP_OK, "prompt": "x" * 1_100_000}, 413,
     None, "larger than"),
]


@pytest.mark.parametrize("path, body, status, param, message", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors_then_success(http, client, path, body, status, param, message) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["param"] == param and message in err["message"]
    succeeds(client)


def test_openai_client_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hello " * 5000, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="not supported yet"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                       extra_body={"structured_outputs": {"json": {}}})
    succeeds(client)


def test_queue_full_is_503_and_frees_on_close(http, client) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1000,
            "stream": True, "ignore_eos": True}
    requests = [http.build_request("POST", "/v1/completions", json=body)
                for _ in range(CAPACITY)]
    with ThreadPoolExecutor(CAPACITY) as pool:
        opened = list(pool.map(lambda req: http.send(req, stream=True), requests))
    try:
        assert [r.status_code for r in opened] == [200] * CAPACITY
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 503 and set(r.json()["error"]) == ERROR_KEYS
        assert "capacity" in r.json()["error"]["message"]
    finally:
        for r in opened:
            r.close()
    wait_idle(http)  # closing the streams aborted them
    succeeds(client)


def test_disconnected_clients_leave_nothing_running(server, http, client) -> None:
    body = {"model": MODEL, "prompt": "Write a poem about the sea.", "max_tokens": 1000,
            "ignore_eos": True}

    def impatient() -> None:  # non-streaming: gives up (disconnects) after a second
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0,
                       headers={"Authorization": f"Bearer {API_KEY}"})

    aborts = metrics(http).get(ABORTS, 0)
    threads = [threading.Thread(target=impatient) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(6):  # streaming: leave after the first event
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))
    for t in threads:
        t.join()
    assert wait_idle(http)[ABORTS] - aborts == 10  # each was running, and was aborted
    succeeds(client)


def test_abort_request_ends_the_stream(http) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1000, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert http.post("/abort_request", json={"rid": first["id"]}).status_code == 200
        events = sse_events(lines)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == \
        ["abort"]
    wait_idle(http)


def test_generate_native_and_stop_token_ids(http, default_tokenizer) -> None:
    text = "The capital of France is"
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    a = http.post("/generate", json={"text": text, "sampling_params": sp}).json()
    ids = default_tokenizer.encode(text)
    b = http.post("/generate", json={"input_ids": ids, "sampling_params": sp}).json()
    assert (a["text"], a["output_ids"]) == (b["text"], b["output_ids"])
    assert len(a["output_ids"]) == 6
    assert a["meta_info"]["prompt_tokens"] == len(ids)
    assert a["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    with http.stream("POST", "/generate", json={"text": text, "sampling_params": sp,
                                                "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert all(e2["text"].startswith(e1["text"]) for e1, e2 in zip(events, events[1:],
                                                                      strict=False))
    assert events[-1]["text"] == a["text"]
    out = a["output_ids"]
    k = next(i for i in range(1, 6) if out[i] not in out[:i])
    c = http.post("/generate", json={"input_ids": ids, "sampling_params": {
        **sp, "ignore_eos": False, "stop_token_ids": [out[k]]}}).json()
    assert c["output_ids"] == out[:k + 1]
    assert c["meta_info"]["finish_reason"] == {"type": "stop", "matched": out[k]}


def test_prefix_cache_and_flush(http) -> None:
    assert http.get("/health_generate").status_code == 200
    wait_idle(http)
    assert http.post("/flush_cache").json() == {"flushed": True}
    body = {"text": "one two three four five six " * 12,
            "sampling_params": {"max_new_tokens": 1}}
    cached = [http.post("/generate", json=body).json()["meta_info"]["cached_tokens"]
              for _ in range(2)]
    assert cached[0] == 0 and cached[1] >= 64
    assert http.post("/flush_cache").status_code == 200
    assert http.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0


def test_metrics_count_tokens_and_latencies(http, client) -> None:
    text = http.get("/metrics").text
    for name in ("engine:num_requests_running", "engine:num_requests_waiting",
                 "engine:kv_cache_usage_perc", "engine:prefix_cache_hit_rate",
                 "engine:num_preemptions_total", "engine:prompt_tokens_total",
                 "engine:generation_tokens_total", "engine:time_to_first_token_seconds_bucket",
                 "engine:inter_token_latency_seconds_bucket",
                 "engine:e2e_request_latency_seconds_bucket"):
        assert f"\n{name}{{" in text
    before = wait_idle(http)
    r = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    after = metrics(http)
    delta = {k: after[k] - before.get(k, 0) for k in after}  # counters absent until first set
    assert delta["engine:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["engine:generation_tokens_total"] == r.usage.completion_tokens == 5
    assert delta["engine:time_to_first_token_seconds_count"] == 1
    assert delta["engine:e2e_request_latency_seconds_count"] == 1
    assert delta["engine:inter_token_latency_seconds_count"] == 4  # one per later token
    assert after["engine:e2e_request_latency_seconds_sum"] > before[
        "engine:e2e_request_latency_seconds_sum"]


def test_health_answers_during_long_prefill(server, http) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(512)]  # 2 uncached chunks of 256
    result: dict = {}

    def long_request() -> None:
        try:
            result["r"] = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                             "max_tokens": 1})
        except httpx.HTTPError as e:
            result["r"] = e

    worker = threading.Thread(target=long_request)
    worker.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        while worker.is_alive():
            t0 = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    worker.join()
    r = result["r"]
    assert isinstance(r, httpx.Response) and r.json()["usage"]["prompt_tokens"] == 512
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_metrics_count_step_programs_compiled_while_serving(http, client) -> None:
    """This server ran no warm-up, so its first steps compiled while serving; a repeat of a
    request whose shapes it has seen compiles nothing."""
    succeeds(client)
    before = metrics(http)["engine:step_compilations_total"]
    assert before >= 1
    succeeds(client)
    assert metrics(http)["engine:step_compilations_total"] == before
