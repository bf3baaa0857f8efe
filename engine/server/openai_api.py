"""/v1/chat/completions, /v1/completions (OpenAI's format) and /generate (SGLang's)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.outputs import CompletionOutput
from engine.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    chat_messages,
    chat_params,
    completion_params,
    native_params,
    parse,
)
from engine.server.requests import RequestGroup
from engine.server.serving import Results, Serving, new_id, now_s


async def chat(s: Serving, request: Request, body: dict[str, Any], arrival: float) -> Response:
    req = parse(ChatCompletionRequest, body)
    s.check_model(req.model)
    params = chat_params(req, s.vocab_size)
    ids = await s.encode_chat(chat_messages(req))
    rid = new_id("chatcmpl")
    group = await s.submit(rid, [ids], params, arrival, "messages")
    head = {"id": rid, "object": "chat.completion.chunk", "created": now_s(),
            "model": s.model_name}
    k, want_lp = params.logprobs or 0, params.logprobs is not None
    usage_field = {"usage": None} if req.include_usage else {}

    def logprobs(c: Any) -> dict | None:
        return s.chat_logprobs(c.token_ids, c.logprobs, k) if want_lp else None

    async def events(g: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        results = Results(params.n)
        for i in range(params.n):  # the first delta of each choice carries the role
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **usage_field}
        async for d in g:
            results.add(d)
            choices = [{"index": c.index, "delta": {"content": c.text} if c.text else {},
                        "logprobs": logprobs(c), "finish_reason": c.finish_reason}
                       for c in d.choices if c.text or c.token_ids or c.finish_reason or want_lp]
            if choices:
                yield {**head, "choices": choices, **usage_field}
        if req.include_usage:
            yield {**head, "choices": [], "usage": results.usage()}

    def build(r: Results) -> dict[str, Any]:
        return {**head, "object": "chat.completion", "usage": r.usage(), "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": logprobs(c), "finish_reason": c.finish_reason}
            for i, c in sorted(r.choices.items())]}

    return await s.respond(request, group, bool(req.stream), events, build)


async def completions(s: Serving, request: Request, body: dict[str, Any],
                      arrival: float) -> Response:
    req = parse(CompletionRequest, body)
    s.check_model(req.model)
    params = completion_params(req, s.vocab_size)
    prompts: Any = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    ids = await s.encode(prompts)
    rid = new_id("cmpl")
    group = await s.submit(rid, ids, params, arrival, "prompt")
    head = {"id": rid, "object": "text_completion", "created": now_s(), "model": s.model_name}
    k, want_lp, n = params.logprobs or 0, params.logprobs is not None, params.n
    usage_field = {"usage": None} if req.include_usage else {}

    async def events(g: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        results, offsets = Results(n), {}
        async for d in g:
            results.add(d)
            choices = []
            for c in d.choices:
                if not (c.text or c.token_ids or c.finish_reason or want_lp):
                    continue
                i, lp = d.prompt_index * n + c.index, None
                if want_lp:
                    lp = s.completion_logprobs(c.token_ids, c.logprobs, k, offsets.get(i, 0))
                    offsets[i] = offsets.get(i, 0) + sum(map(len, lp["tokens"]))
                choices.append({"index": i, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
            if choices:
                yield {**head, "choices": choices, **usage_field}
        if req.include_usage:
            yield {**head, "choices": [], "usage": results.usage()}

    def build(r: Results) -> dict[str, Any]:
        return {**head, "usage": r.usage(), "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": s.completion_logprobs(c.token_ids, c.logprobs, k, 0) if want_lp
             else None}
            for i, c in sorted(r.choices.items())]}

    return await s.respond(request, group, bool(req.stream), events, build)


async def generate(s: Serving, request: Request, body: dict[str, Any],
                   arrival: float) -> Response:
    """SGLang's native endpoint: `text` or `input_ids` (one or a batch), `sampling_params`
    (SGLang's names), `stream` (cumulative text per event, as SGLang streams)."""
    req = parse(GenerateRequest, body)
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "give exactly one of text and input_ids", "text")
    params = native_params(req.sampling_params, s.vocab_size)
    given: Any = req.text if req.text is not None else req.input_ids
    single = isinstance(given, str) or bool(given and isinstance(given[0], int))
    ids = await s.encode([given] if single else list(given))
    param = "text" if req.text is not None else "input_ids"
    group = await s.submit(req.rid or new_id("gen"), ids, params, arrival, param)
    n, many = params.n, not single or params.n > 1

    def item(r: Results, i: int) -> dict[str, Any]:
        c, p = r.choices[i], i // n
        out = {"text": c.text, "output_ids": c.token_ids, "meta_info": {
            "id": group.engine_ids[p], "prompt_tokens": r.prompt_tokens[p],
            "completion_tokens": len(c.token_ids), "cached_tokens": r.cached_tokens[p],
            "finish_reason": _native_finish(c), "e2e_latency": time.monotonic() - arrival}}
        return {**out, "index": i} if many else out

    async def events(g: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        results = Results(n)
        async for d in g:
            results.add(d)
            for c in d.choices:
                yield item(results, d.prompt_index * n + c.index)

    def build(r: Results) -> Any:
        items = [item(r, i) for i in sorted(r.choices)]
        return items if many else items[0]

    return await s.respond(request, group, bool(req.stream), events, build)


def _native_finish(c: CompletionOutput) -> dict[str, Any] | None:
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.token_ids)}
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.stop_reason if c.stop_reason is not None
                else (c.token_ids[-1] if c.token_ids else None)}
    return None if c.finish_reason is None else {"type": c.finish_reason}
