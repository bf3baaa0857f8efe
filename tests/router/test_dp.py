"""`engine serve --dp 2`: two replicas behind the cache-aware router, end to end."""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.server.conftest import MODEL, SMALL, pid_alive, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

SYS_A = "You are a pirate who answers every question about the sea in rhymes. " * 3
SYS_B = "You are a careful lawyer who cites the relevant statute for each claim. " * 3


def test_dp_routes_by_prefix_streams_and_stops_cleanly(default_gguf, tmp_path) -> None:
    with running_server(tmp_path, [*SMALL, "--dp", "2"], name="dp") as server:
        children = server.children()
        assert len(children) == 2
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               timeout=300)

        def replica(prompt: str) -> str:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=prompt, max_tokens=2, temperature=0.0)
            assert raw.parse().choices[0].text is not None
            return raw.headers["x-engine-replica"]

        a, b = replica(SYS_A + "Where is the treasure?"), replica(SYS_B + "Is this legal?")
        assert {a, b} == {"0", "1"}  # distinct prefixes spread over both replicas
        assert replica(SYS_A + "What is a kraken?") == a  # a cached prefix stays put
        stream = client.completions.create(model=MODEL, prompt=SYS_B + "May I appeal?",
                                           max_tokens=3, stream=True,
                                           extra_body={"ignore_eos": True})
        assert stream.response.headers["x-engine-replica"] == b
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"

        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["replicas"] == ["ok", "ok"]
        page = httpx.get(f"{server.url}/metrics", timeout=30).text
        routed = dict(re.findall(r'engine:router_requests_total\{replica="(\d)"\} (\d+)', page))
        assert routed == {a: "2", b: "2"}
        assert re.search(r'engine:generation_tokens_total\{replica="1",', page)

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 0
    assert not [p for p in children if pid_alive(p)]


def test_merged_metrics_have_one_header_per_family_and_a_replica_label_per_sample() -> None:
    from engine.server.router import merge_metrics

    page = ('# HELP engine:x X.\n# TYPE engine:x counter\nengine:x{model_name="m"} {}\n'
            '# HELP engine:h H.\n# TYPE engine:h histogram\n'
            'engine:h_bucket{model_name="m",le="+Inf"} {}\nengine:h_sum{model_name="m"} 0.5\n')
    merged = merge_metrics([page.replace("{}", "3"), page.replace("{}", "4"), "up 1\n"])
    assert merged.splitlines() == [
        "# HELP engine:x X.", "# TYPE engine:x counter",
        'engine:x{replica="0",model_name="m"} 3', 'engine:x{replica="1",model_name="m"} 4',
        "# HELP engine:h H.", "# TYPE engine:h histogram",
        'engine:h_bucket{replica="0",model_name="m",le="+Inf"} 3',
        'engine:h_sum{replica="0",model_name="m"} 0.5',
        'engine:h_bucket{replica="1",model_name="m",le="+Inf"} 4',
        'engine:h_sum{replica="1",model_name="m"} 0.5',
        'up{replica="2"} 1']
