"""Request bodies of the HTTP API (pydantic), their errors, and their SamplingParams.

Unknown fields are ignored, as OpenAI does, except features we do not implement yet
(`UNSUPPORTED`): those are a 400, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.sampling_params import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 500: "internal_server_error",
               503: "service_unavailable_error"}
MAX_N = 128
"""Largest `n` (OpenAI's limit)."""


class ApiError(Exception):
    """An error the client caused or can act on; rendered as the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def _given(v: Any) -> bool:
    return v not in (None, False, "", [], {})


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tool_choice": lambda v: v not in (None, "none"),
    "function_call": lambda v: v not in (None, "none"),
    "best_of": lambda v: v not in (None, 1),
    **{k: _given for k in ("tools", "functions", "structural_tag", "structured_outputs",
                           "prompt_logprobs", "echo", "suffix")},
}
"""Field -> whether its value asks for something we do not implement yet."""


def check_supported(body: dict[str, Any], where: str = "",
                    implemented: Any = ()) -> None:
    """`implemented`: fields this endpoint implements (tools on chat, not on completions)."""
    for key, asks in UNSUPPORTED.items():
        if key in body and key not in implemented and asks(body[key]):
            raise ApiError(400, f"'{where}{key}' is not supported yet", f"{where}{key}",
                           "unsupported_parameter")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class _Sampling(_Body):
    """Fields chat and completions share, including the vLLM/SGLang extras."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # Structured outputs: OpenAI's response_format, SGLang's fields and vLLM's guided_* aliases.
    response_format: dict[str, Any] | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    choice: list[str] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False


class GenerateRequest(_Body):
    """SGLang's native /generate body."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool | None = False
    rid: str | None = None
    return_logprob: bool | None = False
    logprob_start_len: int | None = -1
    """Prompt positions from this one on get logprobs; -1: none (SGLang's default)."""
    top_logprobs_num: int | None = 0
    return_text_in_logprobs: bool | None = False


def parse(model: type[_Body], body: dict[str, Any]) -> Any:
    """Validate a JSON body into `model`; errors are a 400 naming the field."""
    check_supported(body, implemented=model.model_fields)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as chat templates want them: role and string content; an assistant's
    tool_calls with their arguments as objects (HF templates render them with tojson), a
    tool message's tool_call_id and name."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"}
            if kinds:
                raise ApiError(400, f"content parts of type {sorted(kinds)} are not supported "
                               "yet", f"messages.{i}.content", "unsupported_parameter")
            content = "\n".join(p.text or "" for p in content)
        msg: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [_history_call(c, f"messages.{i}.tool_calls.{j}")
                                 for j, c in enumerate(m.tool_calls)]
        msg.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name))
                    if v is not None})
        out.append(msg)
    if not out:
        raise ApiError(400, "messages must not be empty", "messages")
    return out


def _history_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"{where} must be {{'id': ..., 'type': 'function', 'function': "
                       "{'name': ..., 'arguments': ...}}", where)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ApiError(400, f"{where}.function.arguments is not JSON: {args[:100]!r}",
                           f"{where}.function.arguments") from None
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def chat_params(req: ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "logprobs must be true when top_logprobs is set", "top_logprobs")
    max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    # Neither given: the answer may run to the context limit (OpenAI, vLLM, SGLang).
    return make_params(
        _common(req) | dict(max_tokens=getattr(req, max_name),
                            logprobs=(req.top_logprobs or 0) if req.logprobs else None),
        vocab_size, {"max_tokens": max_name, "logprobs": "top_logprobs"},
        defaults={"max_tokens": None})


def completion_params(req: CompletionRequest, vocab_size: int) -> SamplingParams:
    # echo with logprobs: the prompt's tokens get theirs too (computed while it prefills).
    prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
    return make_params(_common(req) | dict(max_tokens=req.max_tokens, logprobs=req.logprobs,
                                           prompt_logprobs=prompt_lp),
                       vocab_size, {"prompt_logprobs": "logprobs"})


def _common(req: _Sampling) -> dict[str, Any]:
    return dict(n=req.n, temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                seed=req.seed, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias,
                top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                stop_token_ids=req.stop_token_ids, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                **_constraint(req))


GUIDED_ALIASES = {"guided_json": "json_schema", "guided_regex": "regex",
                  "guided_choice": "choice", "guided_grammar": "ebnf"}
"""vLLM's older names of the structured-output fields -> ours (SGLang's)."""


def _constraint(req: _Sampling) -> dict[str, Any]:
    """The structured-output fields of SamplingParams; SamplingParams rejects two kinds."""
    out: dict[str, Any] = {}
    given = [(k, getattr(req, k)) for k in ("json_schema", "regex", "ebnf", "choice")]
    given += [(GUIDED_ALIASES[k], getattr(req, k)) for k in GUIDED_ALIASES]
    given += list(_response_format(req.response_format).items())
    for field, value in given:
        if value is None:
            continue
        if field in out:
            raise ApiError(400, f"{field} is given twice (response_format, {field} and "
                           "guided_* name the same constraint): give it once", field)
        out[field] = value
    return out


def _response_format(rf: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's response_format as a constraint: json_object is any JSON object."""
    if rf is None:
        return {}
    kind = rf.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ApiError(400, "response_format.json_schema.schema is required (the JSON "
                           "schema the output must follow)", "response_format.json_schema")
        return {"json_schema": schema}
    raise ApiError(400, f"response_format type {kind!r} is not supported; use 'text', "
                   "'json_object' or 'json_schema'", "response_format.type",
                   "unsupported_parameter")


NATIVE_MAX_NEW_TOKENS = 128
"""SGLang's default max_new_tokens for /generate."""
NATIVE_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                "sampling_seed": "seed"}
"""SGLang's sampling parameter names that differ from ours (ours are accepted too)."""


def native_params(raw: dict[str, Any] | None, vocab_size: int,
                  req: GenerateRequest | None = None) -> SamplingParams:
    """SamplingParams of /generate: `sampling_params`, and the body's logprob fields."""
    raw = dict(raw or {})
    check_supported(raw, "sampling_params.")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = NATIVE_NAMES.get(key, key)
        if name not in fields:
            raise ApiError(400, f"unknown sampling parameter {key!r}", f"sampling_params.{key}")
        kwargs[name] = value
    if req is not None and req.return_logprob:
        kwargs["logprobs"] = req.top_logprobs_num or 0
        if req.logprob_start_len is not None and req.logprob_start_len >= 0:
            kwargs["prompt_logprobs"] = req.top_logprobs_num or 0
            kwargs["prompt_logprobs_start"] = req.logprob_start_len
    back = {v: f"sampling_params.{k}" for k, v in NATIVE_NAMES.items() if k in raw}
    back |= {"logprobs": "top_logprobs_num", "prompt_logprobs": "top_logprobs_num",
             "prompt_logprobs_start": "logprob_start_len"}
    return make_params(kwargs, vocab_size, back, prefix="sampling_params.",
                       defaults={"max_tokens": NATIVE_MAX_NEW_TOKENS})


def make_params(kwargs: dict[str, Any], vocab_size: int, names: dict[str, str],
                prefix: str = "", defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from API values (None: the endpoint's `defaults`, else SamplingParams'
    default); ValueError -> 400 on the field, named as the API names it (`names` maps ours
    to theirs)."""
    kwargs = (defaults or {}) | {k: v for k, v in kwargs.items() if v is not None}
    param = lambda field: names.get(field, prefix + field)
    n = kwargs.get("n", 1)
    if isinstance(n, int) and n > MAX_N:
        raise ApiError(400, f"n must be at most {MAX_N}, got {kwargs['n']}", param("n"))
    bias = kwargs.get("logit_bias")
    if bias is not None:
        kwargs["logit_bias"] = _token_bias(bias, vocab_size, param("logit_bias"))
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param(field) if field in _FIELDS else None) from None


_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def _token_bias(bias: dict[Any, Any], vocab_size: int, param: str) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", param) from None
        if not 0 <= tok < vocab_size:
            raise ApiError(400, f"logit_bias token {tok} is outside the vocabulary "
                           f"[0, {vocab_size})", param)
        if not isinstance(value, int | float):
            raise ApiError(400, f"logit_bias values must be numbers, got {value!r}", param)
        out[tok] = float(value)
    return out


async def read_json(request: Any, limit: int) -> dict[str, Any]:
    """The JSON object body of a starlette Request; 413 past `limit` bytes (whatever
    Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
