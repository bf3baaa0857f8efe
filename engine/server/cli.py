"""`engine serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

Importing this module needs neither FastAPI nor uvicorn: engine.cli registers the subcommand
on every run, and they are imported only when the server starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from engine.options import add_engine_args, engine_options

log = logging.getLogger(__name__)

TOOL_PARSER_NAMES = ("json", "llama3_json", "hermes", "mistral")
"""engine.server.tools.TOOL_PARSERS' names (listed here: this module imports no server code)."""
REASONING_PARSER_NAMES = ("qwen3", "deepseek_r1")
"""engine.server.reasoning.REASONING_PARSERS' names."""


def register_serve(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                       description="Serve the model over HTTP: /v1/chat/completions, "
                       "/v1/completions, /generate, /v1/models, /health, /metrics, ... "
                       "Precedence of engine options: CLI > --config file > defaults.")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, .gguf file or alias (same as --model)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (all routes but /health)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: MODEL, or the default alias)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="sequences that may wait beyond --max-running-requests; more get a "
                   "503 at once (default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="larger request bodies get a 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM or SIGINT, seconds in-flight requests may finish before "
                   "an abort (a second signal aborts them at once)")
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between status lines in the log (0: none)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSER_NAMES),
                   help="how tool calls are read from the model's output (default: by the "
                   "chat template: hermes for <tool_call>, mistral for [TOOL_CALLS], "
                   "llama3_json for <|python_tag|>, else json)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSER_NAMES),
                   help="move <think>...</think> into reasoning_content (default: none)")
    p.add_argument("--dp", type=int, default=1,
                   help="data parallelism: N engine replicas (processes) behind a router")
    p.add_argument("--router-policy", default="cache_aware",
                   choices=["cache_aware", "round_robin"],
                   help="with --dp > 1: how the router picks a replica")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.backend import get_backend
    from engine.config import EngineConfig
    from engine.llm import default_preset
    from engine.loader.hub import DEFAULT_MODEL
    from engine.parallel.mesh import init_distributed
    from engine.server.api import ServerOptions

    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path} and --model {args.model}")
    model = args.model_path or args.model
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.dp < 1:
        raise ValueError(f"--dp must be >= 1, got {args.dp}")
    opts = engine_options(args)
    config = EngineConfig.build(args.config or default_preset(args.backend), model=model,
                                backend=None if args.backend == "auto" else args.backend,
                                **opts)
    # Hardware the backend needs and jax does not see: one error line, before serving (after
    # jax.distributed's start, which must precede the first device query; a no-op for one
    # process, and the builder's own call is then one too).
    backend = get_backend(config.backend.name, dict(config.backend.options))
    init_distributed(config.parallel, backend.capabilities.platform)
    backend.devices()
    if args.dp > 1:
        from engine.server.router import serve_dp

        return serve_dp(args)
    if config.parallel.process_id > 0:  # multi-host: a follower replays process 0's steps
        from engine.builder import build_engine
        from engine.parallel.mirror import follow

        engine, _ = build_engine(config)
        return follow(engine.runner, config.parallel)
    options = ServerOptions(
        host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name or model or DEFAULT_MODEL,
        max_queued_requests=args.max_queued_requests, max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout, log_interval=args.log_interval,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    return serve(config, options)


def serve(config: Any, options: Any) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after the drain) or a fatal error (exit 1)."""
    try:
        import uvicorn

        from engine.server.api import ServerState, create_app
    except ImportError as e:
        raise ValueError(f"engine serve needs FastAPI and uvicorn ({e}): "
                         "pip install fastapi uvicorn") from None

    timers: list[threading.Timer] = []

    signals: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            signals.append(sig)
            if len(signals) == 1:  # first signal: drain, with a deadline
                log.info("shutting down: in-flight requests may finish for %.0fs (a second "
                         "signal aborts them now)", options.shutdown_timeout)
                timers.append(threading.Timer(options.shutdown_timeout, state.abort_all))
                timers[-1].daemon = True
                timers[-1].start()
            elif len(signals) == 2:  # second (SIGINT or SIGTERM): the deadline is now; the
                # requests end with finish_reason "abort" and the drain completes at once.
                # (uvicorn's own force-exit would drop the streams mid-response and skip
                # the engine's shutdown.)
                log.info("second signal: aborting the in-flight requests now")
                state.abort_all()
                return
            super().handle_exit(sig, frame)  # a third: uvicorn stops waiting for anything

    def request_exit() -> None:
        server.should_exit = True

    state = ServerState(config, options, request_exit)
    server = Server(uvicorn.Config(
        create_app(state), host=options.host, port=options.port, log_config=None,
        # Backstop only: at the deadline the requests are aborted and their responses end.
        timeout_graceful_shutdown=options.shutdown_timeout + 5))
    # uvicorn re-raises the signal it handled once it has shut down; with a no-op handler
    # installed first, that returns here and the exit status stays ours.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    for t in timers:
        t.cancel()
    code = state.exit_code
    alive = [t.name for t in (state.loader, state.aeng and state.aeng.thread) if t and
             t.is_alive()]
    if alive:  # a thread stuck in the loader or a device call: do not wait for it
        log.warning("exiting with %s still running", ", ".join(alive))
        logging.shutdown()
        os._exit(code)
    log.info("server stopped")
    return code
