"""Weight updates while serving, and releasing memory to a trainer, on a real server.

Three tiny checkpoints of one architecture (seeds 1 and 2) and one of another width; the
references are fresh in-process engines on the same weights and options."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

OPTIONS = {"max_total_tokens": 2048, "max_running_requests": 4, "chunked_prefill_size": 256}
ARGS = ["--backend", "cpu", "--max-total-tokens", "2048", "--max-running-requests", "4",
        "--chunked-prefill-size", "256", "--log-interval", "0", "--served-model-name", "any"]
PROMPT = ("Once upon a time, in a land far away beyond the seven mountains and the seven "
          "rivers, there lived an old king with three daughters, and the youngest of them")
"""Longer than two KV pages (16 tokens each), so that its prefix is cached."""
LONG = 450
"""Tokens of the request in flight at a swap: it must outlast the update's load (a tiny
checkpoint: a fraction of a second), and prompt + LONG stay within 32 pages (one page
bucket fewer to compile than 600 tokens would need)."""


def write_tiny(path: Path, tokenizer, seed: int, hidden: int = 64) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights large enough that each seed picks its own tokens
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.ndim > 1 else 0.1).add_(1.0 if p.ndim == 1 else 0.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, default_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"a": write_tiny(root / "a", default_tokenizer, 1),
            "b": write_tiny(root / "b", default_tokenizer, 2),
            "wide": write_tiny(root / "wide", default_tokenizer, 3, hidden=96)}


def fresh_engine_on(path: Path) -> dict:
    """Greedy text of PROMPT (8 tokens), LONG tokens of it, and the weights' bytes, from a
    fresh engine on the checkpoint."""
    from engine import LLM, SamplingParams
    from engine.model.weights import tree_bytes

    llm = LLM(str(path), backend="cpu", **OPTIONS)
    short, long = llm.generate([PROMPT, PROMPT], [
        SamplingParams(max_tokens=8, temperature=0),
        SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True)])
    return {"short": short.outputs[0].text, "long": long.outputs[0].text,
            "weight_bytes": tree_bytes(llm.engine.runner.params)}


@pytest.fixture(scope="module")
def started(ckpts, tmp_path_factory):
    """The server on checkpoint a, and the reference on b (made while the server loads)."""
    server = ServerProcess(tmp_path_factory.mktemp("srv") / "server.log",
                           [str(ckpts["a"]), *ARGS])
    try:
        reference = fresh_engine_on(ckpts["b"])
        server.wait_ready()
        yield server, reference
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def reference(started) -> dict:
    return started[1]


@pytest.fixture(scope="module")
def seen() -> dict[str, str]:
    """What the server answered, for the tests after."""
    return {}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                         timeout=120)


def complete(client, **kw):
    return client.completions.create(model="any", prompt=PROMPT, max_tokens=8, temperature=0,
                                     **kw)


def test_update_from_disk_serves_the_new_weights_and_refuses_a_mismatch(
        http, client, ckpts, reference, seen) -> None:
    info = http.get("/get_model_info").json()
    assert info["is_generation"] and info["model_path"] == str(ckpts["a"])
    assert http.get("/get_server_info").json()["weight_version"] == "0"
    seen["a"] = a_text = complete(client).choices[0].text
    assert a_text != reference["short"]  # the test tells the weights apart
    again = complete(client)  # its prompt's K/V are in the prefix cache now
    assert again.choices[0].text == a_text
    assert again.usage.prompt_tokens_details.cached_tokens > 0

    r = http.post("/update_weights_from_disk", json={"model_path": str(ckpts["b"])})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert r.json()["weight_version"] == "1"
    after = complete(client)
    assert after.choices[0].text == reference["short"]
    assert after.usage.prompt_tokens_details.cached_tokens == 0  # flushed: old weights' K/V
    assert http.get("/get_server_info").json()["weight_version"] == "1"
    assert http.get("/get_model_info").json()["model_path"] == str(ckpts["b"])

    for body, words in (({"model_path": str(ckpts["wide"])}, "hidden_size=96"),
                        ({"model_path": str(ckpts["a"] / "nowhere")}, "does not exist"),
                        ({"path": str(ckpts["a"])}, "model_path")):
        r = http.post("/update_weights_from_disk", json=body)
        assert r.status_code == 400 and not r.json()["success"] and words in r.json()["message"]
    assert complete(client).choices[0].text == reference["short"]  # b still serves
    assert http.get("/get_server_info").json()["weight_version"] == "1"


def stream_first(http, max_tokens: int = LONG):
    """A streamed completion that runs on after its first event: (response, lines)."""
    body = {"model": "any", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    cm = http.stream("POST", "/v1/completions", json=body)
    lines = cm.__enter__().iter_lines()
    next(x for x in lines if x.startswith("data: "))
    return cm, lines


def rest(cm, lines) -> tuple[str, str]:
    """(text after the first event, finish reason) of the stream."""
    text, reason = "", None
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    cm.__exit__(None, None, None)
    return text, reason


def test_requests_in_flight_finish_on_the_old_weights_or_are_aborted(
        http, client, ckpts, reference, seen) -> None:
    """Default: the swap waits for the running request (old weights to its end); a request
    sent meanwhile is held and answered by the new weights. abort_running: aborted."""
    assert http.get("/get_server_info").json()["weight_version"] == "1"  # b serves
    resp, lines = stream_first(http)
    answers = []
    update = threading.Thread(target=lambda: answers.append(http.post(
        "/update_weights_from_disk", json={"model_path": str(ckpts["a"]),
                                           "weight_version": "step-2"})))
    update.start()
    deadline = time.monotonic() + 60
    while not http.get("/get_server_info").json()["weight_swap_pending"]:
        assert time.monotonic() < deadline and update.is_alive(), answers
        time.sleep(0.01)
    held = complete(client)  # sent while the swap waits: runs on the new weights
    text, reason = rest(resp, lines)
    update.join(60)
    assert answers[0].status_code == 200 and answers[0].json()["weight_version"] == "step-2"
    assert reason == "length"
    assert reference["long"].endswith(text) and len(text) > 0  # b's tokens to the end
    assert held.choices[0].text == seen["a"]  # a's weights again

    resp, lines = stream_first(http)
    r = http.post("/update_weights_from_disk", json={"model_path": str(ckpts["b"]),
                                                     "abort_running": True})
    assert r.status_code == 200 and r.json()["weight_version"] == "3"
    text, reason = rest(resp, lines)
    assert reason == "abort"
    assert complete(client).choices[0].text == reference["short"]


def test_release_and_resume_memory(http, client, reference) -> None:
    before = complete(client).choices[0].text
    r = http.post("/release_memory_occupation", json={})
    assert r.status_code == 200 and r.json()["success"], r.text
    info = http.get("/get_server_info").json()
    assert info["memory_released"] == ["kv_cache", "weights"]
    kv_bytes = info["max_total_num_tokens"] * 2 * 2 * 2 * 16 * 4  # K+V, layers, Hkv, D, f32
    # Measured from the live arrays (no allocator statistics on the CPU), which a step's
    # small outputs (a few bytes) may join or leave meanwhile.
    assert r.json()["bytes"] == pytest.approx(kv_bytes + reference["weight_bytes"], abs=1024)
    with pytest.raises(openai.APIStatusError) as e:
        complete(client)
    assert e.value.status_code == 503 and "resume_memory_occupation" in e.value.message
    assert http.post("/update_weights_from_disk", json={"model_path": "x"}).status_code == 400
    assert http.post("/release_memory_occupation", json={"tags": ["disk"]}).status_code == 400

    r = http.post("/resume_memory_occupation", json={"tags": ["weights"]})
    assert r.json()["bytes"] == pytest.approx(reference["weight_bytes"], abs=1024)
    assert http.get("/get_server_info").json()["memory_released"] == ["kv_cache"]
    r = http.post("/resume_memory_occupation", json={"tags": ["kv_cache"]})
    assert r.status_code == 200 and r.json()["bytes"] == pytest.approx(kv_bytes, abs=1024)
    assert complete(client).choices[0].text == before
