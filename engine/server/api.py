"""The FastAPI app: routes, errors in OpenAI's shape, the API key, and the server's state.

The HTTP server comes up first and answers /health with 503 while the model loads on a
thread; then the engine thread starts and every route opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from engine import heap
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.server import openai_api
from engine.server.async_engine import AsyncEngine
from engine.server.metrics import ServerMetrics
from engine.server.protocol import ApiError, error_body, read_json
from engine.server.requests import EngineDeadError
from engine.server.serving import Serving, collect, new_id
from engine.server.weights_api import add_weight_routes

log = logging.getLogger(__name__)

DEATH_LINGER_S = 2.0
"""After the engine dies, the server keeps answering (503) this long before it exits, so
that clients and health checks see why."""
HEALTH_GENERATE_TIMEOUT_S = 30.0
OPEN_PATHS = frozenset({"/health"})
"""Paths that need no API key."""


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    """Clients must send `Authorization: Bearer <key>` (all routes but /health)."""
    served_model_name: str = "smollm2-135m-instruct"
    max_queued_requests: int | None = None
    """Sequences that may wait beyond max_running_requests; more get a 503. None: no limit."""
    max_request_bytes: int = 32 << 20
    """Larger request bodies get a 413."""
    shutdown_timeout: float = 30.0
    """On SIGTERM or SIGINT, in-flight requests may finish for this long; then (or at a
    second signal) they are aborted."""
    log_interval: float = 10.0
    """Seconds between status lines in the log (0: none)."""
    tool_call_parser: str | None = None
    """engine.server.tools.TOOL_PARSERS name; None: chosen by the chat template."""
    reasoning_parser: str | None = None
    """engine.server.reasoning.REASONING_PARSERS name; None: no reasoning_content."""


class ServerState:
    """What the routes see: loading -> ready -> failed (load error or engine death).
    Changed only on the event loop."""

    def __init__(self, config: EngineConfig, options: ServerOptions,
                 request_exit: Callable[[], None]) -> None:
        self.config, self.options, self.request_exit = config, options, request_exit
        self.metrics = ServerMetrics()
        self.aeng: AsyncEngine | None = None
        self.serving: Serving | None = None
        self.failure: str | None = None
        self.exit_code = 0
        self.loader: threading.Thread | None = None
        self._closing = False

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loader = threading.Thread(target=self._load, args=(loop,), name="engine-load",
                                       daemon=True)
        self.loader.start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            engine, model = build_engine(self.config)
            if self.config.parallel.num_processes > 1:  # multi-host: followers replay steps
                from engine.parallel.mirror import StepMirror

                engine.runner.mirror = StepMirror(self.config.parallel)
            aeng = AsyncEngine(engine, loop, self.metrics,
                               max_queued_requests=self.options.max_queued_requests,
                               log_interval=self.options.log_interval,
                               on_death=lambda e: loop.call_soon_threadsafe(self._died, e))
            serving = Serving(aeng, model.tokenizer, self.options.served_model_name,
                              model.cfg.vocab_size, engine.max_model_len,
                              self.options.tool_call_parser, self.options.reasoning_parser)
        except Exception as e:
            log.exception("loading the model failed")
            loop.call_soon_threadsafe(self._fail, f"loading the model failed: {e}", 0.0)
            return
        loop.call_soon_threadsafe(self._ready, aeng, serving)

    def _ready(self, aeng: AsyncEngine, serving: Serving) -> None:
        if self._closing:
            return
        # What exists now (~470k tracked objects for a tiny model) lives as long as the
        # server: frozen, the cyclic GC's full collections no longer walk it (at 400 streams
        # they ran every few steps, tens of ms each: scripts/host_serving.py).
        heap.settle()
        aeng.start()
        self.aeng, self.serving = aeng, serving
        o = self.options
        log.info("ready: %s on http://%s:%d (max context %d tokens)", o.served_model_name,
                 o.host, o.port, serving.max_model_len)
        phases = aeng.engine.startup
        if phases is not None:  # (an Engine made without the builder has none)
            phases.mark("server")
            log.info(phases.summary("ready"))

    def _died(self, exc: BaseException) -> None:
        self._fail(f"the engine died ({type(exc).__name__}: {exc})", DEATH_LINGER_S)

    def _fail(self, message: str, linger: float) -> None:
        self.failure, self.exit_code = message, 1
        asyncio.get_running_loop().call_later(linger, self.request_exit)

    def abort_all(self) -> None:
        """Thread-safe: the drain deadline passed."""
        if self.aeng is not None:
            self.aeng.abort_all()

    async def close(self) -> None:
        self._closing = True
        if self.aeng is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.aeng.stop, 10.0)
            mirror = self.aeng.engine.runner.mirror
            if mirror is not None:  # the followers exit
                mirror.close()

    def ready(self) -> Serving:
        if self.failure is not None:
            raise ApiError(503, self.failure)
        if self.serving is None:
            raise ApiError(503, "the model is still loading")
        return self.serving


class ApiKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware, which would get between streams and disconnects)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                resp = JSONResponse(error_body(401, "missing or invalid API key", None,
                                               "invalid_api_key"), status_code=401)
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading(asyncio.get_running_loop())
        yield
        await state.close()

    app = FastAPI(title="engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    if state.options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.options.api_key)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> Response:
        return JSONResponse(error_body(503, str(e)), status_code=503)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"),
                            status_code=500)

    def openai_route(path: str, handler: Callable) -> None:
        async def route(request: Request) -> Response:
            arrival = time.monotonic()
            serving = state.ready()
            body = await read_json(request, state.options.max_request_bytes)
            return await handler(serving, request, body, arrival)

        app.add_api_route(path, route, methods=["POST"], name=handler.__name__)

    openai_route("/v1/chat/completions", openai_api.chat)
    openai_route("/v1/completions", openai_api.completions)
    openai_route("/generate", openai_api.generate)

    @app.get("/health")
    async def health() -> Response:
        if state.failure is not None or state.serving is None:
            return JSONResponse({"status": "error" if state.failure else "loading",
                                 "message": state.failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """Generates one token: proves the whole path, engine thread included, works."""
        serving, t0 = state.ready(), time.monotonic()
        ids = serving.tokenizer.encode("ping") if serving.tokenizer is not None else [0]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        group = await serving.submit(new_id("health"), [ids], params, t0, "prompt")
        try:
            await asyncio.wait_for(collect(group), HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineDeadError) as e:
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}") from None
        finally:
            group.close()
        return JSONResponse({"status": "ok", "latency_s": time.monotonic() - t0})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card(state)]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        if model != state.options.served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model",
                           "model_not_found")
        return JSONResponse(model_card(state))

    @app.get("/metrics")
    async def metrics() -> Response:
        aeng = state.aeng
        stats = aeng.stats if aeng is not None else None
        compiles = aeng.step_compiles if aeng is not None else None
        return PlainTextResponse(
            state.metrics.render(stats, state.options.served_model_name, compiles),
            media_type="text/plain; version=0.0.4")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        """Abort by the response `id` (`rid`); the client gets finish_reason 'abort'."""
        serving = state.ready()
        body = await read_json(request, state.options.max_request_bytes)
        rid = body.get("rid", body.get("request_id"))
        if not isinstance(rid, str):
            raise ApiError(400, "give the request id as 'rid'", "rid")
        serving.aeng.abort(rid)
        return JSONResponse({"rid": rid})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        serving = state.ready()
        if not await serving.aeng.call(lambda engine: engine.scheduler.flush_cache()):
            raise ApiError(400, "cannot flush the prefix cache while requests are running")
        return JSONResponse({"flushed": True})

    add_weight_routes(app, state)
    return app


def model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.options.served_model_name, "object": "model", "created": 0,
            "owned_by": "engine"}
    if state.serving is not None:
        card["max_model_len"] = state.serving.max_model_len
    return card
