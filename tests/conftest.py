"""Session-wide fixtures: the default model, fetched once into the engine cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the engine cache (downloaded on first use)."""
    from engine.loader import hub

    return hub.fetch_model(hub.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf: Path):
    """The default model's transformers tokenizer, from the loader's cached tokenizer folder."""
    from transformers import AutoTokenizer

    from engine.loader.gguf import gguf_tokenizer_dir

    path = gguf_tokenizer_dir(default_gguf, progress=False)
    if path is None:
        pytest.fail(f"no tokenizer could be built from {default_gguf}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf: Path):
    """HF transformers' own load of the default GGUF (dequantized, float32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def default_llm(default_gguf: Path):
    """The default model on the CPU backend, shared by tests that do not change its options."""
    from engine import LLM

    return LLM(backend="cpu", max_total_tokens=8192, max_running_requests=16,
               chunked_prefill_size=256)


@pytest.fixture(scope="session")
def float32_llm(default_gguf: Path):
    """The default model with float32 weights (quantization f32: the blocks dequantized at
    load, float activations), for comparisons with HF transformers token by token; the CPU
    preset keeps the GGUF blocks and quantizes activations, which moves logits by ~1e-2."""
    from engine import LLM

    return LLM(backend="cpu", max_total_tokens=8192, max_running_requests=16,
               chunked_prefill_size=256, quantization="f32")


def pytest_configure(config):
    import jax

    if jax.default_backend() != "cpu":
        # Accelerators run float32 matmuls in reduced precision (TF32) by default; the
        # oracle comparisons are meant in float32.
        jax.config.update("jax_default_matmul_precision", "highest")
