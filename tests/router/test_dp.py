"""`engine serve --dp 2`: two replicas behind the cache-aware router, end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, SMALL, pid_alive, running_server, sse_events

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

SYS_A = "You are a pirate who answers every question about the sea in rhymes. " * 3
SYS_B = "You are a careful lawyer who cites the relevant statute for each claim. " * 3


def test_dp_routes_broadcasts_and_survives_a_replica_death(default_gguf, tmp_path) -> None:
    """Behind --api-key: routing by prefix, streams, the abort and flush broadcasts, then a
    replica killed: the other serves on, /health says which died, the exit status says so."""
    args = [*SMALL, "--dp", "2", "--api-key", API_KEY]
    with running_server(tmp_path, args, name="dp") as server:
        children = server.children()
        assert len(children) == 2
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                               timeout=300)
        http = httpx.Client(base_url=server.url, timeout=60,
                            headers={"Authorization": f"Bearer {API_KEY}"})

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
        page = http.get("/metrics").text
        routed = dict(re.findall(r'engine:router_requests_total\{replica="(\d)"\} (\d+)', page))
        assert routed == {a: "2", b: "2"}
        assert re.search(r'engine:generation_tokens_total\{replica="1",', page)

        # The key guards every route but /health, on the router as on one server.
        nokey = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            nokey.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        for method, path in (("POST", "/flush_cache"), ("POST", "/abort_request"),
                             ("GET", "/metrics"), ("GET", "/v1/models")):
            assert httpx.request(method, server.url + path, json={"rid": "x"}).status_code == 401
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["replicas"] == ["ok", "ok"]

        # /abort_request reaches the replica that runs the request, wherever it is; the
        # flush is refused while it runs (by that replica), done by both once it is over.
        body = {"model": MODEL, "prompt": SYS_A + "Sing", "max_tokens": 3000, "stream": True,
                "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as s:
            assert s.headers["x-engine-replica"] == a
            lines = s.iter_lines()
            rid = json.loads(next(x for x in lines if x.startswith("data: "))[6:])["id"]
            assert http.post("/flush_cache").status_code == 400
            r = http.post("/abort_request", json={"rid": rid})
            assert r.status_code == 200 and r.json() == [{"rid": rid}] * 2
            events = sse_events(lines)
        assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "abort"
        deadline = time.monotonic() + 60
        while (flushed := http.post("/flush_cache")).status_code == 400:  # the abort lands
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert flushed.json() == [{"flushed": True}] * 2

        # Weight updates and memory calls reach every replica; success only when all did.
        r = http.post("/update_weights_from_disk", json={"model_path": MODEL}, timeout=600)
        assert r.status_code == 200 and r.json()["success"], r.text
        assert [x["weight_version"] for x in r.json()["replicas"]] == ["1", "1"]
        info = http.get("/get_server_info").json()
        assert info["weight_version"] == "1" and len(info["replicas"]) == 2
        r = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "no")})
        assert r.status_code == 400 and not r.json()["success"]
        assert r.json()["message"].startswith("2 of 2 replicas failed: replica 0: ")
        r = http.post("/release_memory_occupation", json={"tags": ["kv_cache"]})
        assert r.status_code == 200 and all(x["bytes"] > 0 for x in r.json()["replicas"])
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        assert e.value.status_code == 503
        assert http.post("/resume_memory_occupation", json={}).json()["success"]
        assert replica(SYS_A + "What is a kraken?") == a

        pids = dict(re.findall(r"replica (\d): pid (\d+)", server.log_path.read_text()))
        os.kill(int(pids[b]), signal.SIGKILL)
        deadline = time.monotonic() + 60  # a loaded host takes a while to end a big process
        while httpx.get(f"{server.url}/health", timeout=30).json()["replicas"][int(b)] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert replica(SYS_B + "Is this legal?") == a  # b's prefix goes to the survivor
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["replicas"][int(b)] == "dead"
        assert f'engine:router_replica_up{{replica="{b}"}} 0' in http.get("/metrics").text
        http.close()

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(90) == 1  # a replica died: not a clean run
    assert not [p for p in children if pid_alive(p)]


def test_a_broadcast_succeeds_only_when_every_replica_did() -> None:
    from engine.server.router import all_succeeded

    ok = httpx.Response(200, json={"success": True, "message": "done"})
    refused = httpx.Response(400, json={"success": False, "message": "shape (3,) vs (4,)"})
    body, status = all_succeeded([ok, ok])
    assert (status, body["success"], body["message"]) == (200, True, "all replicas succeeded")
    body, status = all_succeeded([ok, refused, httpx.ConnectError("refused")])
    assert status == 400 and not body["success"]
    assert body["message"] == ("2 of 3 replicas failed: replica 1: shape (3,) vs (4,); "
                               "replica 2: did not answer: refused")
    body, status = all_succeeded([httpx.ConnectError("gone"), ok])
    assert status == 503 and body["replicas"][1] == {"success": True, "message": "done"}


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
