"""`engine serve --backend npu --npu-device cpu`: the default model through the NPU
backend's torch executor, streamed to the official `openai` client, gives the CPU
backend's greedy answer."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.server.conftest import MODEL, running_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ARGS = ["--backend", "npu", "--npu-device", "cpu", "--max-total-tokens", "2048",
        "--max-running-requests", "4", "--chunked-prefill-size", "64"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_npu_cpu_server_streams_the_cpu_backends_greedy_chat(tmp_path, default_gguf,
                                                             default_llm, monkeypatch):
    want = default_llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0.0))[0]
    # One torch thread in the server (see tests/backends/npu/conftest.py for why).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with running_server(tmp_path, ARGS, name="npu") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                               timeout=300)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0.0, stream=True,
            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) >= 2  # streamed, not one piece
    assert text == want.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
