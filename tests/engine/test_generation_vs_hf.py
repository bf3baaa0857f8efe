"""Whole-engine generation (scheduler, paged KV, CPU attention, sampler) vs HF transformers."""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model

PROMPTS = [[5, 9, 200, 31, 7], [17] * 3 + [99, 100, 101, 102, 250, 4, 4, 8], [42]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def tiny_model_dir(request, tmp_path_factory):
    model = make_hf_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.mark.parametrize("page_size,budget", [(4, 16), (1, 64)])
def test_greedy_tokens_equal_hf(tiny_model_dir, page_size, budget):
    """Chunked prefill (budget 16 splits the prompts) and decode give HF's greedy tokens."""
    path, model = tiny_model_dir
    llm = LLM(str(path), backend="cpu", page_size=page_size, chunked_prefill_size=budget,
              max_running_requests=4, max_total_tokens=512)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(model, prompt, 12)
        assert out.finish_reason == "length"
