"""Request bodies to SamplingParams (engine.server.protocol), without a server: the defaults
each endpoint applies when the client leaves a field out."""

from __future__ import annotations

import pytest

from engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_params,
    completion_params,
    native_params,
    parse,
)

VOCAB = 1000
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("extra, want", [
    ({}, None),  # absent: up to the context limit (OpenAI, vLLM, SGLang)
    ({"max_tokens": None}, None),
    ({"max_tokens": 7}, 7),
    ({"max_completion_tokens": 9}, 9),
    ({"min_tokens": 40}, None),  # above the old default of 16: no longer a 400
])
def test_chat_max_tokens(extra, want) -> None:
    params = chat_params(parse(ChatCompletionRequest, {**CHAT, **extra}), VOCAB)
    assert params.max_tokens == want


def test_completions_and_native_keep_their_apis_defaults() -> None:
    body = {"model": "m", "prompt": "Hi"}
    assert completion_params(parse(CompletionRequest, body), VOCAB).max_tokens == 16  # OpenAI
    assert native_params(None, VOCAB).max_tokens == 128  # SGLang's max_new_tokens
    assert native_params({"max_new_tokens": 5}, VOCAB).max_tokens == 5
