"""`engine serve --dp N`: N engine replicas behind a routing HTTP proxy.

The replicas are child `engine serve` processes (engine.router.replicas); the routing logic
is plain Python (engine.router.policy). This module is the HTTP part, here because the
server stack (FastAPI, uvicorn) stays inside engine/server. Requests and responses pass
through unchanged, streams included; the response names its replica in `x-engine-replica`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.router.policy import POLICIES, Policy, RouterConfig, least_loaded, routing_key
from engine.router.replicas import start_replicas, stop_replicas

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-engine-replica"
READY_TIMEOUT_S = 900.0
PROBE_TIMEOUT_S = 10.0
"""/health and /metrics of a replica: answered by its event loop, never by its engine."""
BROADCAST_TIMEOUT_S = 120.0
"""/flush_cache and /abort_request sent to every replica: a flush waits for the replica's
current step, which may be compiling (seconds on a GPU, longer on a loaded host)."""
HOP_BY_HOP = frozenset({"host", "content-length", "connection", "keep-alive",
                        "transfer-encoding", "te", "upgrade", "date", "server"})


class RouterState:
    """Replica URLs, liveness and load (requests in flight through this router). Changed
    only on the event loop."""

    def __init__(self, urls: list[str], alive: list[Callable[[], bool]], policy: Policy) -> None:
        self.urls, self.alive, self.policy = urls, alive, policy
        self.loads = [0] * len(urls)
        self.routed = [0] * len(urls)
        self.dead: set[int] = set()
        self.client: httpx.AsyncClient | None = None

    def reap(self) -> None:
        for r, alive in enumerate(self.alive):
            if r not in self.dead and not alive():
                log.error("replica %d died; routing to the others", r)
                self.dead.add(r)
                self.policy.forget(r)

    def live_loads(self) -> dict[int, int]:
        self.reap()
        return {r: n for r, n in enumerate(self.loads) if r not in self.dead}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "service_unavailable_error",
                                   "param": None, "code": None}}, status_code=status)


class UpstreamStream(StreamingResponse):
    """A replica's response passed through; `release` runs however the response ends,
    even when a disconnect cancels it before the body was read."""

    def __init__(self, upstream: httpx.Response, release: Callable[[], Any],
                 headers: dict[str, str]) -> None:
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code,
                         headers=headers)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.release()


async def forward(state: RouterState, request: Request, r: int, body: bytes) -> Response:
    """Send the request to replica r and stream its answer back, status and body as is."""
    assert state.client is not None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    url = state.urls[r] + request.url.path
    state.loads[r] += 1
    state.routed[r] += 1
    try:
        upstream = await state.client.send(state.client.build_request(
            request.method, url, content=body, headers=headers, params=request.query_params),
            stream=True)
    except httpx.HTTPError as e:
        state.loads[r] -= 1
        return error(503, f"replica {r} did not answer: {type(e).__name__}: {e}")
    except BaseException:  # cancelled: the client went away before the replica answered
        state.loads[r] -= 1
        raise
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.loads[r] -= 1
            await upstream.aclose()

    out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    return UpstreamStream(upstream, release, {**out, REPLICA_HEADER: str(r)})


def create_router_app(state: RouterState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                         limits=httpx.Limits(max_connections=None),
                                         trust_env=False)
        yield
        await state.client.aclose()

    app = FastAPI(title="engine router", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def route(request: Request) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # a replica answers the malformed body with its 400
        loads = state.live_loads()
        if not loads:
            return error(503, "no engine replica is alive")
        r = state.policy.choose(routing_key(request.url.path, parsed), loads)
        return await forward(state, request, r, body)

    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        app.add_api_route(path, route, methods=["POST"])

    async def any_replica(request: Request) -> Response:
        loads = state.live_loads()
        if not loads:
            return error(503, "no engine replica is alive")
        return await forward(state, request, least_loaded(loads), await request.body())

    for path in ("/v1/models", "/v1/models/{model:path}", "/health_generate"):
        app.add_api_route(path, any_replica, methods=["GET"])

    async def fetch_all(request: Request, path: str, method: str = "GET", body: bytes = b"",
                        timeout: float = PROBE_TIMEOUT_S) -> list[httpx.Response | Exception]:
        assert state.client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in
                   ("authorization", "content-type")}
        calls = [state.client.request(method, u + path, headers=headers, content=body,
                                      timeout=timeout) for u in state.urls]
        return await asyncio.gather(*calls, return_exceptions=True)

    @app.get("/health")
    async def health(request: Request) -> Response:
        state.reap()
        answers = await fetch_all(request, "/health")
        status = ["dead" if r in state.dead else
                  f"error: {a}" if isinstance(a, Exception) else
                  "ok" if a.status_code == 200 else f"status {a.status_code}"
                  for r, a in enumerate(answers)]
        ok = all(s == "ok" for s in status)
        return JSONResponse({"status": "ok" if ok else "error", "replicas": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.reap()
        pages = []
        for a in await fetch_all(request, "/metrics"):
            if isinstance(a, httpx.Response) and a.status_code != 200:
                return Response(a.content, a.status_code, media_type="application/json")
            pages.append(a.text if isinstance(a, httpx.Response) else "")
        return PlainTextResponse(merge_metrics(pages) + router_metrics(state),
                                 media_type="text/plain; version=0.0.4")

    async def broadcast(request: Request) -> Response:
        answers = await fetch_all(request, request.url.path, request.method,
                                  await request.body(), BROADCAST_TIMEOUT_S)
        for a in answers:
            if isinstance(a, Exception):
                return error(503, f"a replica did not answer: {a}")
            if a.status_code != 200:
                return Response(a.content, a.status_code, media_type="application/json")
        return JSONResponse([a.json() for a in answers if isinstance(a, httpx.Response)])

    app.add_api_route("/flush_cache", broadcast, methods=["GET", "POST"])
    app.add_api_route("/abort_request", broadcast, methods=["POST"])

    async def broadcast_update(request: Request) -> Response:
        """Every replica updates (or releases, resumes); success only when all did, and the
        message names each replica that did not."""
        answers = await fetch_all(request, request.url.path, request.method,
                                  await request.body(), UPDATE_TIMEOUT_S)
        return JSONResponse(*all_succeeded(answers))

    for path in ("/update_weights_from_disk", "/release_memory_occupation",
                 "/resume_memory_occupation"):
        app.add_api_route(path, broadcast_update, methods=["POST"])

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> Response:
        answers = await fetch_all(request, "/get_server_info")
        infos = [a.json() if isinstance(a, httpx.Response) and a.status_code == 200 else
                 {"error": str(a) if isinstance(a, Exception) else a.text} for a in answers]
        versions = {i.get("weight_version") for i in infos}
        return JSONResponse({"weight_version": versions.pop() if len(versions) == 1 else None,
                             "replicas": infos})

    app.add_api_route("/get_model_info", any_replica, methods=["GET"])
    return app


UPDATE_TIMEOUT_S = 1800.0
"""A weight update reads a checkpoint (minutes for a large one) and waits for the running
requests to finish."""


def all_succeeded(answers: list[httpx.Response | Exception]) -> tuple[dict[str, Any], int]:
    """The replicas' {"success", "message"} answers as one, with its status: 200 when every
    replica succeeded, else the first failure's status (503 when one did not answer)."""
    replicas, failed, status = [], [], 200
    for r, a in enumerate(answers):
        if isinstance(a, Exception):
            body, code = {"success": False, "message": f"did not answer: {a}"}, 503
        else:
            try:
                body = a.json()
            except ValueError:
                body = {"success": False, "message": a.text}
            code = a.status_code
            if not isinstance(body, dict) or "success" not in body:  # an API error's shape
                body = {"success": False, "message": str(body)}
        replicas.append(body)
        if code != 200 or not body.get("success"):
            failed.append(f"replica {r}: {body.get('message')}")
            if status == 200:  # the first failure's: a refusal (400) or an error
                status = code if code != 200 else 400
    message = ("all replicas succeeded" if not failed else
               f"{len(failed)} of {len(answers)} replicas failed: " + "; ".join(failed))
    return {"success": not failed, "message": message, "replicas": replicas}, status


def merge_metrics(pages: list[str]) -> str:
    """The replicas' Prometheus pages as one: each family once, every sample labelled with
    its replica."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # name -> (HELP/TYPE, samples)
    for r, page in enumerate(pages):
        name = ""
        for line in page.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split()[2]
                meta = families.setdefault(name, ([], []))[0]
                if line not in meta:
                    meta.append(line)
            elif line and not line.startswith("#"):
                metric, brace, rest = line.partition("{")
                labelled = f'{metric}{{replica="{r}",{rest}' if brace else \
                    f'{metric.split()[0]}{{replica="{r}"}} {metric.split()[-1]}'
                families.setdefault(name, ([], []))[1].append(labelled)
    return "".join(line + "\n" for meta, samples in families.values() for line in meta + samples)


def router_metrics(state: RouterState) -> str:
    lines = []
    for name, kind, help_, values in (
            ("engine:router_requests_total", "counter", "Requests routed to the replica.",
             state.routed),
            ("engine:router_requests_in_flight", "gauge", "Requests the replica is serving.",
             state.loads),
            ("engine:router_replica_up", "gauge", "1 while the replica process runs.",
             [int(r not in state.dead) for r in range(len(state.urls))])):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{replica="{r}"}} {v}' for r, v in enumerate(values)]
    return "\n".join(lines) + "\n"


def serve_dp(args: argparse.Namespace) -> int:
    """Start args.dp replicas, route on args.host:args.port until SIGTERM/SIGINT, then let
    in-flight requests finish and stop the replicas."""
    policy = POLICIES[args.router_policy](RouterConfig())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per proxied request

    def stop_starting(sig: int, _: Any) -> None:
        raise SystemExit(128 + sig)  # unwinds start_replicas, which stops the children

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_starting)
    try:
        replicas = start_replicas(args, args.dp, READY_TIMEOUT_S)
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    try:
        state = RouterState([r.url for r in replicas], [r.alive for r in replicas], policy)
        server = uvicorn.Server(uvicorn.Config(
            create_router_app(state), host=args.host, port=args.port, log_config=None,
            timeout_graceful_shutdown=args.shutdown_timeout))
        # uvicorn re-raises the signal it handled once it has shut down; see serve().
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        log.info("router (%s) on http://%s:%d over %d replicas", args.router_policy,
                 args.host, args.port, len(replicas))
        server.run()
    finally:
        stop_replicas(replicas, args.shutdown_timeout + 15.0)
    codes = [r.proc.returncode for r in replicas]
    log.info("router stopped; replica exit codes %s", codes)
    return 0 if server.started and not any(codes) else 1
