"""Process lifecycle, each test on its own server: SIGTERM and SIGINT drain (a second
signal aborts at once), /health while loading, and the engine dying."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, SMALL, ServerProcess, pid_alive, running_server, sse_events

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

DRAIN_S = 5.0
"""--shutdown-timeout here; the default is 30 s."""
SLACK_S = 10.0
"""Late the abort may come on a loaded host, and still tell DRAIN_S from the default."""
PING = 4200
"""The token of "ping": /health_generate's prompt."""


def faulty_device(gate: Path) -> str:
    """Test hook, in the test only: the server process runs this before `engine.cli.main`.
    Loading waits until `gate` exists; a batch holding /health_generate's prompt fails like
    a device error would."""
    return f"""
import os, time
import engine.runner, engine.server.api
_build = engine.server.api.build_engine
def _build_when_allowed(config):
    while not os.path.exists({str(gate)!r}):
        time.sleep(0.05)
    return _build(config)
engine.server.api.build_engine = _build_when_allowed
_execute = engine.runner.ModelRunner.execute
def _execute_or_fail(self, batch):
    if any(s.request.prompt_token_ids == [{PING}] for s in batch.seqs):
        raise RuntimeError("injected device failure")
    return _execute(self, batch)
engine.runner.ModelRunner.execute = _execute_or_fail
"""


def _stream(http: httpx.Client, max_tokens: int):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    return http.stream("POST", "/v1/completions", json=body)


def _first_event(lines) -> dict:
    return json.loads(next(line for line in lines if line.startswith("data: "))[6:])


def test_sigterm_drains_then_aborts_at_the_deadline(default_gguf, tmp_path) -> None:
    with running_server(tmp_path, [*SMALL, "--shutdown-timeout", str(DRAIN_S)]) as server:
        children = server.children()
        with httpx.Client(base_url=server.url, timeout=120) as http, \
                _stream(http, 4) as short, _stream(http, 3000) as long:
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            first = [_first_event(short_lines), _first_event(long_lines)]  # both running
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                httpx.get(f"{server.url}/health", timeout=5)
            short_events, long_events = sse_events(short_lines), sse_events(long_lines)
            aborted_after = time.monotonic() - t0
        assert server.proc.wait(DRAIN_S + 30) == 0
        exited_after = time.monotonic() - t0
    # The long request was aborted at the 5 s deadline, not before and not at 30 s.
    assert DRAIN_S - 0.5 <= aborted_after < DRAIN_S + SLACK_S, aborted_after
    assert exited_after < DRAIN_S + SLACK_S + 5, exited_after
    assert not [p for p in children if pid_alive(p)]
    # The short request finished normally during the drain; the long one was aborted at
    # the deadline and still got its last event, usage and [DONE].
    for events, reason in ((short_events, "length"), (long_events, "abort")):
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == [reason]
    assert short_events[-1]["usage"]["completion_tokens"] == 4
    assert 1 <= long_events[-1]["usage"]["completion_tokens"] < 3000
    assert first[0]["choices"][0]["finish_reason"] is None


def test_sigint_drains_and_a_second_signal_aborts_at_once(default_gguf, tmp_path) -> None:
    with running_server(tmp_path, [*SMALL, "--shutdown-timeout", "120"]) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http, \
                _stream(http, 4) as short, _stream(http, 3000) as long:
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            _first_event(short_lines)
            _first_event(long_lines)
            server.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same drain as SIGTERM
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.url}/health", timeout=5)
            short_events = sse_events(short_lines)
            _first_event(long_lines)  # still generating
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGINT)  # again: no more waiting
            long_events = sse_events(long_lines)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15  # not the 120 s drain
    for events, reason in ((short_events, "length"), (long_events, "abort")):
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == [reason]
    assert 1 <= long_events[-1]["usage"]["completion_tokens"] < 3000
    assert "server stopped" in server.log_tail(20)


def test_loading_then_a_failing_health_generate_and_engine_death(default_gguf, default_tokenizer,
                                                                  tmp_path) -> None:
    assert default_tokenizer.encode("ping") == [PING]
    gate = tmp_path / "load"
    server = ServerProcess(tmp_path / "dying.log", SMALL, preamble=faulty_device(gate))
    try:
        deadline = time.monotonic() + 120
        while True:  # the HTTP server is up before the model
            try:
                loading = httpx.get(f"{server.url}/health", timeout=2)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and server.proc.poll() is None
                time.sleep(0.2)
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health_generate").status_code == 503
        page = httpx.get(f"{server.url}/metrics").text  # counters only: no engine yet
        assert "engine:prompt_tokens_total{" in page and "num_requests_running" not in page
        gate.touch()
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as http, _stream(http, 3000) as s:
            lines = s.iter_lines()
            _first_event(lines)  # in flight when the engine dies
            r = http.get("/health_generate")  # its one token fails the device step
            assert r.status_code == 503
            assert "generation failed" in r.json()["error"]["message"]
            assert "engine died" in r.json()["error"]["message"]
            r = http.post("/generate", json={"input_ids": [1, 2, 3],
                                             "sampling_params": {"max_new_tokens": 4}})
            assert r.status_code == 503 and "engine died" in r.json()["error"]["message"]
            assert http.get("/health").status_code == 503
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            assert r.status_code == 503 and set(r.json()["error"]) >= {"message", "type"}
            events = sse_events(lines)  # an error event, then [DONE]
        assert "engine died" in events[-1]["error"]["message"]
        assert server.proc.wait(30) == 1
        assert "injected device failure" in server.log_tail(200)
    finally:
        server.stop()


def test_load_failure_exits_nonzero(tmp_path) -> None:
    server = ServerProcess(tmp_path / "bad.log", [str(tmp_path / "missing.gguf"), *SMALL])
    try:
        assert server.proc.wait(120) == 1
        assert "loading the model failed" in server.log_tail(200)
    finally:
        server.stop()
