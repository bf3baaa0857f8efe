"""Routes for RL frameworks (SGLang's names and shapes): weight updates while serving,
releasing device memory to a co-located trainer, and which weights serve.

    POST /update_weights_from_disk   {model_path, load_format?, abort_running?, weight_version?}
    POST /release_memory_occupation  {tags?: ["kv_cache", "weights"]}
    POST /resume_memory_occupation   {tags?}
    GET  /get_model_info, /get_server_info (weight_version)

Updates and memory calls answer {"success": bool, "message": str} (400 when refused; the
engine serves on as before).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from engine import memory
from engine.loader.checkpoint import ModelLoadError
from engine.model.config import ConfigError
from engine.server.requests import EngineDeadError

log = logging.getLogger(__name__)

REFUSED = (ValueError, ModelLoadError, ConfigError, OSError)
"""Failures of a request's own making (bad path, other architecture): a 400."""


def answer(success: bool, message: str, status: int | None = None, **extra: Any) -> Response:
    return JSONResponse({"success": success, "message": message, **extra},
                        status_code=status or (200 if success else 400))


def add_weight_routes(app: FastAPI, state: Any) -> None:
    """Register the routes on the server's app (`state`: engine.server.api.ServerState)."""
    from engine.server.protocol import read_json

    lock = asyncio.Lock()  # one update or memory change at a time
    model_path: dict[str, str | None] = {"now": state.config.model.model}

    async def body_of(request: Request) -> dict[str, Any]:
        if int(request.headers.get("content-length") or 0) == 0:
            return {}
        return await read_json(request, state.options.max_request_bytes)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        aeng = state.ready().aeng
        body = await body_of(request)
        path, fmt = body.get("model_path"), body.get("load_format") or "auto"
        version, abort = body.get("weight_version"), body.get("abort_running", False)
        if not isinstance(path, str) or not path:
            return answer(False, "give the checkpoint as 'model_path' (an HF folder, a .gguf "
                          "file or a model alias)")
        if version is not None and not isinstance(version, str):
            return answer(False, f"weight_version must be a string, got {version!r}")
        if not isinstance(abort, bool):
            return answer(False, f"abort_running must be true or false, got {abort!r}")
        async with lock:
            engine = aeng.engine
            if engine.memory_released:
                return answer(False, "the engine's memory is released: POST "
                              "/resume_memory_occupation before updating the weights")
            from engine.builder import load_update

            t0 = time.monotonic()
            try:  # read and placed off the step loop, which serves on meanwhile
                params = await asyncio.get_running_loop().run_in_executor(
                    None, load_update, state.config, engine.weight_recipe,
                    engine.runner.backend, engine.runner.params, path, fmt)
            except REFUSED as e:
                log.warning("weight update from %s refused: %s", path, e)
                return answer(False, f"{type(e).__name__}: {e}")
            loaded = time.monotonic() - t0
            try:
                version = await aeng.swap_weights(params, abort, version)
            except EngineDeadError:
                raise
            except ValueError as e:  # refused by the engine (multi-host serving)
                return answer(False, str(e))
            except Exception as e:
                log.exception("weight swap failed")
                return answer(False, f"{type(e).__name__}: {e}", 500)
            model_path["now"] = path
        message = (f"weights of {path} serve from weight version {version} (loaded in "
                   f"{loaded:.1f}s, swapped after {time.monotonic() - t0 - loaded:.1f}s)")
        log.info("%s", message)
        return answer(True, message, weight_version=version)

    async def memory_call(request: Request, fn: Any, verb: str) -> Response:
        aeng = state.ready().aeng
        body = await body_of(request)
        try:
            tags = memory.check_tags(body.get("tags"))
        except ValueError as e:
            return answer(False, str(e))
        async with lock:
            try:
                nbytes = await aeng.call(lambda engine: fn(engine, tags))
            except ValueError as e:
                return answer(False, str(e))
        message = f"{verb} {', '.join(tags)}: {nbytes / 2**20:.1f} MiB of device memory"
        log.info("%s", message)
        return answer(True, message, bytes=nbytes)

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: Request) -> Response:
        return await memory_call(request, memory.release, "released")

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: Request) -> Response:
        return await memory_call(request, memory.resume, "took back")

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        serving = state.ready()
        engine = serving.aeng.engine
        tok = serving.tokenizer
        return JSONResponse({
            "model_path": model_path["now"] or state.options.served_model_name,
            "tokenizer_path": getattr(tok, "name_or_path", None) if tok is not None else None,
            "is_generation": True, "preferred_sampling_params": None,
            "weight_version": engine.weight_version, "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": engine.weight_recipe.cfg.arch,
            "architectures": None})

    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        serving = state.ready()
        engine = serving.aeng.engine
        sched = engine.scheduler.config
        return JSONResponse({
            "model_path": model_path["now"] or state.options.served_model_name,
            "served_model_name": state.options.served_model_name,
            "weight_version": engine.weight_version,
            "memory_released": sorted(engine.memory_released),
            "weight_swap_pending": serving.aeng.swap_pending,
            "backend": state.config.backend.name,
            "max_model_len": serving.max_model_len,
            "max_total_num_tokens": sched.num_pages * sched.page_size,
            "max_running_requests": sched.max_running_requests,
            "engine_config": dataclasses.asdict(state.config.model),
            # SGLang's shape: clients (its bench_serving.py) read internal_states[0].
            "internal_states": [{"avg_spec_accept_length": _accept_length(engine)}]})


def _accept_length(engine: Any) -> float | None:
    """Tokens a verify step yields on average (accepted drafts + 1), as SGLang reports it;
    None when no speculative step has run."""
    stats = engine.scheduler.stats()
    return stats.spec_tokens_per_verify or None
