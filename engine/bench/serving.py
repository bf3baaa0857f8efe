"""`engine bench serving`: a workload against a running server, as SGLang's and vLLM's
serving benchmarks measure it.

Requests are token-id prompts streamed from /v1/completions with max_tokens = the request's
output length and ignore_eos, so every request generates exactly that many tokens. They
arrive as a Poisson process (`--request-rate`, inf: all at once), at most
`--max-concurrency` in flight. TTFT is the time to the first chunk with text, ITL the time
between chunks with text, TPOT (E2E - TTFT) / (output tokens - 1).

Only httpx and numpy: this runs where the server stack (FastAPI) is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import time
from typing import Any

import httpx
import numpy as np

from engine.bench.datasets import BenchRequest, make_requests

METRIC_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$')


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)


def completion_body(model: str | None, req: BenchRequest) -> dict[str, Any]:
    body = {"prompt": req.prompt_ids, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    return {**body, "model": model} if model else body


async def send_request(client: httpx.AsyncClient, model: str | None,
                       req: BenchRequest) -> RequestResult:
    out = RequestResult(len(req.prompt_ids))
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions",
                                 json=completion_body(model, req)) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = str(event["error"].get("message", event["error"]))
                    return out
                if event.get("usage"):
                    out.output_len = event["usage"]["completion_tokens"]
                if event.get("choices"):  # a chunk per step with new tokens (text may be empty)
                    now = time.perf_counter()
                    if out.ttft == 0.0:
                        out.ttft = now - t0
                    else:
                        out.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = time.perf_counter() - t0
    out.success = out.ttft > 0.0
    if not out.success:
        out.error = "the stream ended without tokens"
    return out


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's counters of interest, summed over label sets (replicas, reasons), plus
    the router's per-replica request counts; empty if /metrics is not there."""
    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    if resp.status_code != 200:
        return {}
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name in ("engine:prefix_cache_hits_total", "engine:prefix_cache_queries_total"):
            out[name] = out.get(name, 0.0) + float(value)
        elif name == "engine:router_requests_total":
            out[f"{name}{{{labels}}}"] = float(value)
    return out


async def run(base_url: str, model: str | None, reqs: list[BenchRequest], request_rate: float,
              max_concurrency: int | None, warmup: list[BenchRequest], seed: int = 0,
              api_key: str | None = None) -> tuple[list[RequestResult], float, dict]:
    """Send the warm-up requests one by one, then the workload; returns the results, the
    workload's duration and the /metrics counter deltas over it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30.0)) as client:
        for w in warmup:
            r = await send_request(client, model, w)
            if not r.success:
                raise RuntimeError(f"the warm-up request failed: {r.error}")
        before = await read_metrics(client)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = np.random.default_rng(seed)

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await send_request(client, model, req)
            async with gate:
                return await send_request(client, model, req)

        t0, tasks = time.perf_counter(), []
        for i, req in enumerate(reqs):
            tasks.append(asyncio.create_task(one(req)))
            if i + 1 < len(reqs) and not math.isinf(request_rate):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        after = await read_metrics(client)
    return list(results), duration, {k: v - before.get(k, 0.0) for k, v in after.items()}


def summarize(results: list[RequestResult], duration: float, counters: dict) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    inputs, outputs = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]

    def stats(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, dtype=float) * 1e3 if values else np.zeros(1)
        return {"mean": float(a.mean()), "median": float(np.median(a)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())}

    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration, "input_throughput": inputs / duration,
        "output_throughput": outputs / duration,
        "total_throughput": (inputs + outputs) / duration,
        "ttft_ms": stats([r.ttft for r in ok]), "tpot_ms": stats(tpots),
        "itl_ms": stats([t for r in ok for t in r.itl]),
        "e2e_latency_ms": stats([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.success})[:5],
    }
    queries = counters.get("engine:prefix_cache_queries_total")
    if queries:
        out["prefix_cache_hit_rate"] = counters["engine:prefix_cache_hits_total"] / queries
    routed = {k.split('"')[1]: int(v) for k, v in counters.items() if k.startswith(
        "engine:router_requests_total")}
    if routed:
        out["requests_per_replica"] = routed
    return out


def report(s: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{s['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_throughput']:.2f}")]
    if "prefix_cache_hit_rate" in s:
        rows.append(("Prefix cache hit rate", f"{s['prefix_cache_hit_rate']:.3f}"))
    if "requests_per_replica" in s:
        rows.append(("Requests per replica", s["requests_per_replica"]))
    for key, title, short in (
            ("ttft_ms", "Time to First Token", "TTFT"),
            ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
            ("itl_ms", "Inter-Token Latency", "ITL"),
            ("e2e_latency_ms", "End-to-End Latency", "E2E Latency")):
        rows.append((title, None))
        rows += [(f"{name} {short} (ms)", f"{s[key][stat]:.2f}") for name, stat in
                 (("Mean", "mean"), ("Median", "median"), ("P99", "p99"), ("Max", "max"))]
    width = max(len(k) for k, v in rows if v is not None) + 2
    lines = [f"{' Serving Benchmark Result ':=^{width + 12}}"]
    for k, v in rows:
        lines.append(f"{' ' + k + ' ':-^{width + 12}}" if v is None else
                     f"{k + ':':<{width}}{v}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines + ["=" * (width + 12)])


def main(args: argparse.Namespace) -> int:
    """`engine bench serving`: 0 when every request succeeded."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    reqs = make_requests(args, args.vocab_size)
    # Warm-up prompts of the workload's first lengths but fresh ids: no cache hit to skew it.
    rng = np.random.default_rng(args.dataset_seed + 1)
    warmup = [BenchRequest(rng.integers(10, args.vocab_size // 2, len(r.prompt_ids)).tolist(),
                           min(r.output_len, 8)) for r in reqs[:args.warmup_requests]]
    results, duration, counters = asyncio.run(run(
        base_url, args.model, reqs, args.request_rate, args.max_concurrency, warmup,
        args.seed, args.api_key))
    summary = summarize(results, duration, counters)
    print(report(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       **summary}, f, indent=2)
    return 0 if summary["completed"] == len(reqs) else 1
