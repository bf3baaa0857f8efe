"""SmolLM2-135M-Instruct from its GGUF: our logits and greedy tokens equal HF transformers'
(which loads and dequantizes the same GGUF itself)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from engine.loader.load import load_checkpoint
from engine.model.weights import params_from_hf
from engine.sampling_params import SamplingParams
from tests.models.hf_reference import hf_logits, our_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def ours(default_gguf):
    ckpt = load_checkpoint(str(default_gguf), progress=False)
    return ckpt.config, params_from_hf(ckpt.tensors, ckpt.config, jnp.float32, scan=False)


def test_logits_match_hf(ours, hf_default_model, default_tokenizer):
    cfg, params = ours
    ids = default_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    ref = hf_logits(hf_default_model, ids)
    got = our_logits(cfg, params, ids, page_size=16, chunks=[len(ids) - 7, 7])
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=2e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_hf(float32_llm, hf_default_model, default_tokenizer):
    n = 24
    outs = float32_llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0.0,
                                                        ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = default_tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_default_model.generate(torch.tensor([ids]), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False)
        assert out.token_ids == ref[0, len(ids):].tolist(), prompt
