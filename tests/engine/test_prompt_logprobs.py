"""Prompt logprobs vs HF transformers' log-softmax over the same prompt (float32).

Computed in the prompt's own steps: chunked prefill (chunks smaller than the prompts) and a
mixed batch with decoding rows; a prefix-cache hit must not change them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model

TOL = 1e-3


def hf_logprobs(model, prompt: list[int]) -> np.ndarray:
    """[P, V]: row i scores the token at position i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def check(out, prompt: list[int], ref: np.ndarray, k: int, start: int = 1) -> None:
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and all(lp is None for lp in lps[:start])
    got = np.array([lps[i][prompt[i]] for i in range(start, len(prompt))])
    want = np.array([ref[i - 1, prompt[i]] for i in range(start, len(prompt))])
    np.testing.assert_allclose(got, want, atol=TOL)
    for i in range(start, len(prompt)):
        assert len(lps[i]) in (k, k + 1)  # the top k, plus the token when not among them
        if k:  # the k largest values are HF's k largest
            got_top = sorted(lps[i].values(), reverse=True)[:k]
            np.testing.assert_allclose(got_top, np.sort(ref[i - 1])[::-1][:k], atol=TOL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_hf_model("llama3", seed=5)
    path = tmp_path_factory.mktemp("tiny_plp")
    model.save_pretrained(path, safe_serialization=True)
    return LLM(str(path), backend="cpu", page_size=4, chunked_prefill_size=16,
               max_running_requests=4, max_total_tokens=512), model


def test_tiny_config_in_chunks_and_mixed_batches(tiny) -> None:
    llm, model = tiny
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (45, 9, 3)]
    params = [SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=5),
              SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0),
              SamplingParams(max_tokens=20, temperature=0)]  # decodes beside the others
    outs = llm.generate(prompts, params)
    for out, prompt, k in zip(outs[:2], prompts, (5, 0), strict=False):
        check(out, prompt, hf_logprobs(model, prompt), k)
    assert outs[2].prompt_logprobs is None
    # Again: the prompt's pages are cached now; the logprobs must be computed all the same,
    # and a later start leaves the positions before it out.
    again = llm.generate(prompts[0], SamplingParams(max_tokens=1, prompt_logprobs=5,
                                                    prompt_logprobs_start=20))[0]
    check(again, prompts[0], hf_logprobs(model, prompts[0]), 5, start=20)


def test_default_model(float32_llm: LLM, default_tokenizer, hf_default_model) -> None:
    # One prompt step (each new step shape compiles the whole model: chunking is the tiny
    # model's test above).
    prompt = default_tokenizer.encode("The capital of France is Paris. The capital of Italy "
                                      "is Rome, and the capital of Spain is Madrid.")
    out = float32_llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    check(out, prompt, hf_logprobs(hf_default_model, prompt), 1)
