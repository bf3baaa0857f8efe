"""`engine serve --speculative-algorithm ngram`: a streamed completion (several tokens a step
arrive together) equals the non-streamed one, and /metrics counts the drafts."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import MODEL, SMALL, ServerProcess, metrics, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

TEXT = ("The quick brown fox jumps over the lazy dog. It was a sunny day in the park and the "
        "children played near the old oak tree while their parents talked.")
PROMPT = f"Repeat the following text exactly.\nText: {TEXT}\nRepeated text:"


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*SMALL, "--speculative-algorithm", "ngram", "--speculative-num-draft-tokens", "4",
            "--no-speculative-adaptive"]
    with running_server(tmp_path_factory.mktemp("spec"), args) as s:
        yield s


def test_stream_equals_non_stream_and_drafts_are_counted(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=120)
    http = httpx.Client(base_url=server.url, timeout=120)
    before = metrics(http)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=[" park"])
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    text = full.choices[0].text
    assert text and "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert full.choices[0].finish_reason == "stop" and "park" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    after = metrics(http)
    drafted = (after["engine:spec_decode_num_draft_tokens_total"]
               - before["engine:spec_decode_num_draft_tokens_total"])
    accepted = (after["engine:spec_decode_num_accepted_tokens_total"]
                - before["engine:spec_decode_num_accepted_tokens_total"])
    assert drafted >= accepted >= 10  # both requests copied from the prompt
    assert 0 < after["engine:spec_decode_acceptance_rate"] <= 1
    assert after["engine:spec_decode_tokens_per_step"] > 1
    # SGLang's bench_serving.py reads this after every run (a KeyError without it).
    info = http.get("/get_server_info").json()
    assert info["internal_states"][0]["avg_spec_accept_length"] == pytest.approx(
        after["engine:spec_decode_tokens_per_step"], rel=1e-6)
