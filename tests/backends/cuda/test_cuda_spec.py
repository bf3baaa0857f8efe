"""Speculative decoding on the CUDA backend (its kernels interpreted on a host without a
GPU): a verify row (a decode with drafts) goes through the ragged prompt kernel and must
give the tokens a run without speculation gives (the CPU backend's)."""

import jax
import pytest

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="exact token equality needs exact float32; the GPU kernel runs TF32")
def test_cuda_backend_speculation_keeps_greedy_tokens(tmp_path):
    make_hf_model("qwen3", seed=4).save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1]]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = dict(dtype="float32", max_total_tokens=512, max_running_requests=4,
                chunked_prefill_size=32, page_size=4)
    # The CPU backend's tokens: test_cuda_model checks the CUDA backend gives them too.
    plain = LLM(str(tmp_path), backend="cpu", **opts).generate(prompts, sp)
    llm = LLM(str(tmp_path), backend="cuda", interpret=True, speculative_algorithm="ngram",
              speculative_adaptive=False, **opts)
    assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in plain]
    assert llm.engine.scheduler.stats().num_draft_tokens > 0
