"""/v1/chat/completions, /v1/completions (OpenAI's format) and /generate (SGLang's)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.server.chat_output import ChoiceOutput
from engine.server.native_stream import cumulative_events
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
from engine.server.tools import ToolParser, ToolRequest
from engine.structured import KINDS


async def chat(s: Serving, request: Request, body: dict[str, Any], arrival: float) -> Response:
    req = parse(ChatCompletionRequest, body)
    s.check_model(req.model)
    params = chat_params(req, s.vocab_size)
    tools = ToolRequest.parse(req.tools, req.tool_choice, req.parallel_tool_calls)
    params = _with_tools(params, req, tools, s.tool_parser)
    ids = await s.encode_chat(chat_messages(req), tools, req.chat_template_kwargs)
    rid = new_id("chatcmpl")
    try:
        group = await s.submit(rid, [ids], params, arrival, "messages")
    except ApiError as e:  # a forced tool choice compiles the tools' parameter schemas
        if tools is not None and tools.forced and e.param == "json_schema":
            raise ApiError(400, f"a tool's parameters do not compile: {e.message}",
                           "tools") from None
        raise
    head = {"id": rid, "object": "chat.completion.chunk", "created": now_s(),
            "model": s.model_name}
    k, want_lp = params.logprobs or 0, params.logprobs is not None
    usage_field = {"usage": None} if req.include_usage else {}

    def logprobs(c: Any) -> dict | None:
        return s.chat_logprobs(c.token_ids, c.logprobs, k) if want_lp else None

    def splitter() -> ChoiceOutput:
        return ChoiceOutput(s.reasoning_parser, tools, s.tool_parser)

    async def events(g: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        results = Results(params.n)
        outs = [splitter() for _ in range(params.n)]
        for i in range(params.n):  # the first delta of each choice carries the role
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **usage_field}
        async for d in g:
            results.add(d)
            choices = []
            for c in d.choices:
                delta: dict[str, Any] = outs[c.index].feed(c.text)
                reason = c.finish_reason
                if reason is not None:
                    rest, calls = outs[c.index].finish()
                    delta = _joined(delta, rest)
                    if calls:
                        delta["tool_calls"] = [{"index": j, **call.openai()}
                                               for j, call in enumerate(calls)]
                        reason = _finish(reason, calls)
                if delta or c.token_ids or reason or want_lp:
                    choices.append({"index": c.index, "delta": delta, "logprobs": logprobs(c),
                                    "finish_reason": reason})
            if choices:
                yield {**head, "choices": choices, **usage_field}
        if req.include_usage:
            yield {**head, "choices": [], "usage": results.usage()}

    def message(c: Any) -> tuple[dict[str, Any], str | None]:
        out = splitter()
        first = out.feed(c.text)
        rest, calls = out.finish()
        fields = _joined(first, rest)
        msg: dict[str, Any] = {"role": "assistant", "content": fields.get("content")
                               if calls else fields.get("content", "")}
        if s.reasoning_parser is not None:
            msg["reasoning_content"] = fields.get("reasoning_content")
        if calls:
            msg["tool_calls"] = [call.openai() for call in calls]
        return msg, _finish(c.finish_reason, calls)

    def build(r: Results) -> dict[str, Any]:
        choices = []
        for i, c in sorted(r.choices.items()):
            msg, reason = message(c)
            choices.append({"index": i, "message": msg, "logprobs": logprobs(c),
                            "finish_reason": reason})
        return {**head, "object": "chat.completion", "usage": r.usage(), "choices": choices}

    return await s.respond(request, group, bool(req.stream), events, build)


def _with_tools(params: SamplingParams, req: ChatCompletionRequest, tools: ToolRequest | None,
                parser: ToolParser) -> SamplingParams:
    """A forced tool choice as a constraint; special tokens kept where they mark calls."""
    if tools is None or tools.choice == "none":
        return params
    changes: dict[str, Any] = {}
    if not parser.skip_special_tokens and req.skip_special_tokens is None:
        changes["skip_special_tokens"] = False
    schema = tools.forced_schema()
    if schema is not None:
        given = [k for k in KINDS if getattr(params, k) is not None]
        if given:
            raise ApiError(400, f"tool_choice {tools.choice!r} is enforced with a grammar and "
                           f"cannot be combined with {given[0]} (or response_format)",
                           "tool_choice")
        changes["json_schema"] = schema
    return dataclasses.replace(params, **changes) if changes else params


def _joined(a: dict[str, str], b: dict[str, str]) -> dict[str, Any]:
    return {k: a.get(k, "") + b.get(k, "") for k in (*a, *(k for k in b if k not in a))}


def _finish(reason: str | None, calls: list[Any]) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


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
    # echo: each choice starts with its prompt (and, with logprobs, the prompt's logprobs).
    echoed = [p if isinstance(p, str) else s.decode(p) for p in prompts] if req.echo else None

    def prompt_part(r: Results, p: int) -> tuple[str, dict | None]:
        if echoed is None:
            return "", None
        lps = r.prompt_logprobs.get(p) if want_lp else None
        return echoed[p], s.completion_logprobs(ids[p], lps, k, 0) if want_lp else None

    def joined(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {key: a[key] + b[key] for key in a}

    async def events(g: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        results, offsets = Results(n), {}
        async for d in g:
            results.add(d)
            choices = []
            for c in d.choices:
                if not (c.text or c.token_ids or c.finish_reason or want_lp):
                    continue
                i, lp = d.prompt_index * n + c.index, None
                text, plp = prompt_part(results, d.prompt_index) if i not in offsets \
                    else ("", None)
                offsets.setdefault(i, len(text))
                if want_lp:
                    lp = s.completion_logprobs(c.token_ids, c.logprobs, k, offsets[i])
                    offsets[i] += sum(map(len, lp["tokens"]))
                choices.append({"index": i, "text": text + c.text, "logprobs": joined(plp, lp),
                                "finish_reason": c.finish_reason})
            if choices:
                yield {**head, "choices": choices, **usage_field}
        if req.include_usage:
            yield {**head, "choices": [], "usage": results.usage()}

    def build(r: Results) -> dict[str, Any]:
        choices = []
        for i, c in sorted(r.choices.items()):
            text, plp = prompt_part(r, i // n)
            lp = s.completion_logprobs(c.token_ids, c.logprobs, k, len(text)) if want_lp \
                else None
            choices.append({"index": i, "text": text + c.text, "finish_reason": c.finish_reason,
                            "logprobs": joined(plp, lp)})
        return {**head, "usage": r.usage(), "choices": choices}

    return await s.respond(request, group, bool(req.stream), events, build)


async def generate(s: Serving, request: Request, body: dict[str, Any],
                   arrival: float) -> Response:
    """SGLang's native endpoint: `text` or `input_ids` (one or a batch), `sampling_params`
    (SGLang's names), `stream` (cumulative text per event, as SGLang streams)."""
    req = parse(GenerateRequest, body)
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "give exactly one of text and input_ids", "text")
    params = native_params(req.sampling_params, s.vocab_size, req)
    given: Any = req.text if req.text is not None else req.input_ids
    single = isinstance(given, str) or bool(given and isinstance(given[0], int))
    ids = await s.encode([given] if single else list(given))
    param = "text" if req.text is not None else "input_ids"
    group = await s.submit(req.rid or new_id("gen"), ids, params, arrival, param)
    n, many = params.n, not single or params.n > 1

    def rest(r: Results, i: int) -> dict[str, Any]:
        """An item's keys after text and output_ids."""
        c, p = r.choices[i], i // n
        out: dict[str, Any] = {"meta_info": {
            "id": group.engine_ids[p], "prompt_tokens": r.prompt_tokens[p],
            "completion_tokens": len(c.token_ids), "cached_tokens": r.cached_tokens[p],
            "finish_reason": _native_finish(c), "e2e_latency": time.monotonic() - arrival}}
        if req.return_logprob:
            out["meta_info"].update(_native_logprobs(
                s, ids[p], r.prompt_logprobs.get(p), c, params, bool(req.return_text_in_logprobs)))
        return {**out, "index": i} if many else out

    def item(r: Results, i: int) -> dict[str, Any]:
        c = r.choices[i]
        return {"text": c.text, "output_ids": c.token_ids, **rest(r, i)}

    def events(g: RequestGroup) -> AsyncIterator[str]:
        results = Results(n)
        return cumulative_events(g, n, results.add, lambda i: rest(results, i))

    def build(r: Results) -> Any:
        items = [item(r, i) for i in sorted(r.choices)]
        return items if many else items[0]

    return await s.respond(request, group, bool(req.stream), events, build)


def _native_logprobs(s: Serving, prompt: list[int], prompt_lps: list | None,
                     c: CompletionOutput, params: SamplingParams, text: bool) -> dict[str, Any]:
    """SGLang's logprob fields: [logprob, token id, text or None] per token (the first
    prompt token's logprob is None), and the top ones per position."""
    k = params.logprobs or 0

    def entry(lp: float | None, tid: int) -> list:
        return [lp, tid, s.token_text(tid) if text else None]

    def tops(lp: dict[int, float] | None) -> list | None:
        return None if lp is None else [entry(v, t) for t, v in
                                        sorted(lp.items(), key=lambda kv: -kv[1])[:k]]

    start = params.prompt_logprobs_start if params.prompt_logprobs is not None else len(prompt)
    lps = prompt_lps or [None] * len(prompt)
    return {
        "input_token_logprobs": [entry(None if lps[i] is None else lps[i][prompt[i]], prompt[i])
                                 for i in range(start, len(prompt))],
        "input_top_logprobs": [tops(lps[i]) for i in range(start, len(prompt))],
        "output_token_logprobs": [entry(lp[t], t) for t, lp in
                                  zip(c.token_ids, c.logprobs or [], strict=True)],
        "output_top_logprobs": [tops(lp) for lp in c.logprobs or []],
    }


def _native_finish(c: CompletionOutput) -> dict[str, Any] | None:
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.token_ids)}
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.stop_reason if c.stop_reason is not None
                else (c.token_ids[-1] if c.token_ids else None)}
    return None if c.finish_reason is None else {"type": c.finish_reason}
