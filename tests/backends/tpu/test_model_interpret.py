"""The whole model under `--backend tpu` (the Pallas kernel in TPU interpret mode, the TPU
KV layout and write) gives the CPU backend's greedy tokens on tiny models."""

from __future__ import annotations

import functools

import pytest

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model

PROMPTS = [[5, 9, 200, 31, 7], [17] * 3 + [99, 100, 101, 102, 250, 4, 4, 8, 3, 3, 60, 61, 2],
           [42]]


@pytest.fixture(scope="module")
def interpret_config(tmp_path_factory) -> str:
    """The TPU backend pinned to the TPU interpreter (also on a TPU VM)."""
    path = tmp_path_factory.mktemp("cfg") / "tpu-interpret.yaml"
    path.write_text("backend: {name: tpu, interpret: tpu}\n")
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    @functools.cache
    def save(name: str):
        path = tmp_path_factory.mktemp(name)
        make_hf_model(name, seed=3).save_pretrained(path, safe_serialization=True)
        return path

    return save


@functools.cache
def greedy(path, backend: str, scan_layers: bool | None = None,
           config: str | None = None) -> tuple[tuple[int, ...], ...]:
    # A 16-token budget splits the 16-token prompt over two steps (a chunk extending a
    # cached prefix) and mixes prompt chunks with decodes; 16-token pages make later tokens
    # start mid-page.
    llm = LLM(str(path), backend=backend, dtype="float32", page_size=16,
              chunked_prefill_size=16, max_running_requests=4, max_total_tokens=512,
              scan_layers=scan_layers, config=config)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return tuple(tuple(out.token_ids) for out in llm.generate(PROMPTS, sp))


@pytest.mark.parametrize("model,scan_layers", [
    ("llama3", True),  # stacked [L, ...] cache read at a traced layer index
    ("qwen2", True),  # qkv bias, tied embeddings
    ("qwen2", False),  # per-layer caches
])
def test_tpu_backend_greedy_tokens_equal_cpu(model_dir, interpret_config, model, scan_layers):
    path = model_dir(model)
    want = greedy(path, "cpu")
    assert len(set(want)) == len(PROMPTS)  # the prompts are told apart
    assert greedy(path, "tpu", scan_layers, interpret_config) == want
