"""Request handling shared by the endpoints: tokenize, submit, stream or collect, shape.

Chat and completions answer in OpenAI's format, /generate in SGLang's. Tokenization and
chat templates run in the default thread pool, never on the event loop or the engine thread.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from engine.memory import MemoryReleasedError
from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.server.async_engine import AsyncEngine
from engine.server.protocol import ApiError, error_body
from engine.server.reasoning import REASONING_PARSERS
from engine.server.requests import Delta, EngineDeadError, QueueFullError, RequestGroup
from engine.server.tools import TOOL_PARSERS, ToolRequest, detect_parser
from engine.server.tools.request import template_takes_tools, tools_system_text

log = logging.getLogger(__name__)

Events = Callable[[RequestGroup], AsyncIterator[dict[str, Any] | str]]


RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "tokenize",
                                   "add_generation_prompt", "return_dict"})
"""apply_chat_template arguments chat_template_kwargs may not set."""


def with_tools_message(messages: list[dict[str, Any]], tools: ToolRequest) -> list[dict[str, Any]]:
    """`messages` with the tools described in the system message (for a template that does
    not take `tools`)."""
    text = tools_system_text(tools.tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text},
                *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_as_content(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool_calls written into its content (the json parser's
    format), for a template that renders content only."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    text = "\n".join(json.dumps({"name": c["function"]["name"],
                                 "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                     for c in calls)
    return {**message, "content": (message["content"] + "\n" + text).lstrip("\n")}


class Results:
    """Deltas folded back into whole outputs, keyed by choice index (prompt * n + choice)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.choices: dict[int, CompletionOutput] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.prompt_logprobs: dict[int, list[dict[int, float] | None]] = {}

    def add(self, d: Delta) -> None:
        self.prompt_tokens[d.prompt_index] = d.prompt_tokens
        if d.prompt_logprobs is not None:
            self.prompt_logprobs[d.prompt_index] = d.prompt_logprobs
        self.cached_tokens[d.prompt_index] = d.cached_tokens
        for c in d.choices:
            out = self.choices.setdefault(d.prompt_index * self.n + c.index,
                                          CompletionOutput(c.index))
            out.text += c.text
            out.token_ids += c.token_ids
            if c.logprobs is not None:
                out.logprobs = (out.logprobs or []) + c.logprobs
            out.finish_reason, out.stop_reason = c.finish_reason, c.stop_reason

    def usage(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}


class Serving:
    def __init__(self, aeng: AsyncEngine, tokenizer: Any, model_name: str, vocab_size: int,
                 max_model_len: int, tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        """`tool_call_parser`: a TOOL_PARSERS name, None to choose by the chat template;
        `reasoning_parser`: a REASONING_PARSERS name, None for none."""
        self.aeng, self.model_name = aeng, model_name
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        # The engine thread decodes with the original; a Rust tokenizer must not be used
        # from two threads at once, so the HTTP side encodes with its own copy.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        template = getattr(tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else None
        self.template_takes_tools = template_takes_tools(template)
        self.tool_parser = TOOL_PARSERS[tool_call_parser or detect_parser(template)]()
        self.reasoning_parser = REASONING_PARSERS[reasoning_parser] if reasoning_parser \
            else None

    # -- prompts ---------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{self.model_name}`.", "model", "model_not_found")

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        if any(isinstance(p, str) for p in prompts) and self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
        tok = self.tokenizer
        return await asyncio.get_running_loop().run_in_executor(None, lambda: [
            tok.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            for p in prompts])

    async def encode_chat(self, messages: list[dict[str, Any]], tools: ToolRequest | None = None,
                          template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The prompt of `messages`; `tools` go to the template (`tools=`), or into a system
        message when the template does not take them; `template_kwargs` are the template's
        own variables (e.g. enable_thinking)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template", "messages")
        kwargs = dict(template_kwargs or {})
        taken = sorted(set(kwargs) & RESERVED_TEMPLATE_ARGS)
        if taken:
            raise ApiError(400, f"chat_template_kwargs must not set {taken}",
                           "chat_template_kwargs")
        if tools is not None and tools.choice != "none":
            if self.template_takes_tools:
                kwargs["tools"] = list(tools.tools)
            else:
                messages = with_tools_message(messages, tools)
        if not self.template_takes_tools:
            messages = [calls_as_content(m) for m in messages]

        def run() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False, **kwargs)
            except TemplateError as e:
                raise ApiError(400, f"the chat template rejected the messages: {e}",
                               "messages") from None
            return tok.encode(text, add_special_tokens=False)

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def submit(self, gid: str, prompts: list[list[int]], params: SamplingParams,
                     arrival: float, param: str) -> RequestGroup:
        if not prompts:
            raise ApiError(400, f"{param} must not be empty", param)
        size, capacity = len(prompts) * params.n, self.aeng.capacity
        if capacity is not None and size > capacity:  # never fits: a 503 "retry" would lie
            raise ApiError(400, f"this request needs {size} sequences ({len(prompts)} "
                           f"prompt(s) x n={params.n}), but the server runs or queues at most "
                           f"{capacity} at once", "n" if params.n > 1 else param)
        try:
            return await self.aeng.submit(gid, prompts, params, arrival)
        except ValueError as e:
            code = "context_length_exceeded" if "maximum context length" in str(e) else None
            # A constraint that does not compile names its field (GrammarError.param).
            raise ApiError(400, str(e), getattr(e, "param", None) or param, code) from None
        except (QueueFullError, EngineDeadError, MemoryReleasedError) as e:
            raise ApiError(503, str(e)) from None

    # -- answering ---------------------------------------------------------------------------
    async def respond(self, request: Request, group: RequestGroup, stream: bool, events: Events,
                      build: Callable[[Results], Any]) -> Response:
        """Stream `events(group)` as SSE, or collect the group and answer `build(results)`."""
        if stream:
            return GroupStream(group, sse(group, events))
        try:
            results = await until_disconnected(request, collect(group))
        except EngineDeadError as e:
            raise ApiError(503, str(e)) from None
        finally:
            group.close()
        if results is None:  # the client left; its request was aborted
            return Response(status_code=499)
        return JSONResponse(build(results))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def top(self, lp: dict[int, float], k: int) -> list[tuple[str, float]]:
        """The k most likely (text, logprob) of one position (the dict holds the chosen
        token first, then the top alternatives; the chosen one may be among them)."""
        best = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        return [(self.token_text(t), _finite(v)) for t, v in best]

    def chat_logprobs(self, ids: list[int], lps: list[dict[int, float]] | None, k: int) -> dict:
        content, lps = [], lps or []
        for tid, lp in zip(ids, lps, strict=True):
            text = self.token_text(tid)
            content.append({"token": text, "logprob": _finite(lp[tid]),
                            "bytes": list(text.encode()),
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                             for t, v in self.top(lp, k)]})
        return {"content": content}

    def completion_logprobs(self, ids: list[int], lps: list[dict[int, float] | None] | None,
                            k: int, offset: int) -> dict:
        """OpenAI's completion logprobs; a None entry (the first prompt token's, with echo)
        is null."""
        texts, lps = [self.token_text(t) for t in ids], lps or []
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": texts,
                "token_logprobs": [None if lp is None else _finite(lp[t])
                                   for t, lp in zip(ids, lps, strict=True)],
                "top_logprobs": [None if lp is None else dict(self.top(lp, k)) for lp in lps],
                "text_offset": offsets}


class GroupStream(StreamingResponse):
    """SSE that closes (so aborts, if unfinished) its group however the response ends, even
    when a disconnect cancels it before the body generator ever ran."""

    def __init__(self, group: RequestGroup, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.close()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -Infinity


async def collect(group: RequestGroup) -> Results:
    results = Results(group.params.n)
    async for d in group:
        results.add(d)
    return results


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, or cancel it and return None when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse(group: RequestGroup, events: Events) -> AsyncIterator[str]:
    """Server-sent events ending in [DONE], also after an error. A client that goes away
    cancels this generator; `close()` then aborts its request."""
    try:
        async for event in events(group):  # a str: an event already encoded as JSON
            data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
            yield f"data: {data}\n\n"
    except EngineDeadError as e:
        yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
    except Exception as e:
        log.exception("error while streaming %s", group.gid)
        yield f"data: {json.dumps(error_body(500, f'internal error: {e}'))}\n\n"
    finally:
        group.close()
    yield "data: [DONE]\n\n"
