"""`engine bench serving` against a real server process: counts, tokens and latencies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.bench.datasets import random_requests
from engine.bench.serving import run
from engine.cli import main
from tests.server.conftest import MODEL, SMALL, ServerProcess, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

WORKLOAD = ["--dataset", "random", "--num-prompts", "5", "--random-input-len", "24",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--vocab-size", "32000"]


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("bench"), SMALL) as s:
        yield s


def test_every_request_generates_its_max_tokens_with_ordered_latencies(
        server: ServerProcess) -> None:
    reqs = random_requests(4, 24, 6, 0.5, 32000, seed=3)
    results, duration, counters = asyncio.run(run(
        server.url, MODEL, reqs, request_rate=50.0, max_concurrency=2, warmup=reqs[:1]))
    assert [r.error for r in results] == [""] * 4
    assert [r.output_len for r in results] == [q.output_len for q in reqs]
    assert [r.prompt_len for r in results] == [len(q.prompt_ids) for q in reqs]
    for r in results:
        assert 0 < r.ttft <= r.latency <= duration
        assert all(t > 0 for t in r.itl) and len(r.itl) < r.output_len
    assert counters["engine:prefix_cache_queries_total"] >= sum(len(q.prompt_ids) for q in reqs)


def test_cli_prints_the_report_and_writes_json(server: ServerProcess, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "result.json"
    assert main(["bench", "serving", "--base-url", server.url, *WORKLOAD,
                 "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Median TTFT (ms)" in printed
    assert "Max ITL (ms)" in printed
    s = json.loads(out.read_text())
    expected = random_requests(5, 24, 6, 0.5, 32000, seed=0)
    assert s["completed"] == 5 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(q.output_len for q in expected)
    assert s["total_input_tokens"] == sum(len(q.prompt_ids) for q in expected)
    assert s["request_throughput"] == pytest.approx(5 / s["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert 0 < s[key]["median"] <= s[key]["p99"] <= s[key]["max"]
    assert s["ttft_ms"]["mean"] <= s["e2e_latency_ms"]["mean"]
    assert s["ttft_ms"]["p99"] <= s["e2e_latency_ms"]["p99"]


def test_a_model_without_tokenizer_streams_a_chunk_per_step(tmp_path: Path) -> None:
    """Random weights from a config.json have no tokenizer: every chunk's text is empty, and
    the benchmark still times each token step (the server sends chunks with new tokens)."""
    from tests.bench.test_offline_bench import TINY

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    args = ["--backend", "cpu", "--load-format", "dummy", "--model", str(config),
            "--max-total-tokens", "2048", "--max-running-requests", "4"]
    reqs = random_requests(3, 16, 6, 1.0, TINY["vocab_size"], seed=1)
    with running_server(tmp_path, args, name="tokenless") as s:
        results, _, _ = asyncio.run(run(s.url, None, reqs, request_rate=float("inf"),
                                        max_concurrency=None, warmup=reqs[:1]))
    assert [r.error for r in results] == [""] * 3
    assert [r.output_len for r in results] == [6] * 3
    for r in results:
        assert 0 < r.ttft <= r.latency and 1 <= len(r.itl) <= 5
