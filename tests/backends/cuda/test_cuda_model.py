"""The whole engine on the CUDA backend (its decode kernel interpreted on a host without a GPU)
gives the CPU backend's greedy tokens on a tiny model (E, KV heads and head dim powers of two:
the K/V write and add+RMSNorm kernels run too, with gate/up and q/k/v fused)."""

import jax
import pytest

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="exact token equality needs exact float32; the GPU kernel runs TF32 "
                           "(tests/backends/cuda/test_cuda_attention.py checks it there)")
@pytest.mark.parametrize("decode_impl", ["jax", "gqa"])
def test_cuda_backend_greedy_equals_cpu(tmp_path, decode_impl):
    make_hf_model("qwen3", seed=4).save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18, 28], list(range(40, 75))]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = dict(dtype="float32", max_total_tokens=512, max_running_requests=4,
                chunked_prefill_size=32, page_size=4)
    cpu = LLM(str(tmp_path), backend="cpu", **opts).generate(prompts, sp)
    # (no start-up warm-up: interpreted kernels compile slowly, and only the tokens matter)
    cuda = LLM(str(tmp_path), backend="cuda", options={"decode_impl": decode_impl},
               interpret=True, warmup_decode_len=0, warmup_prompt_steps=False,
               **opts).generate(prompts, sp)
    assert [o.token_ids for o in cuda] == [o.token_ids for o in cpu]
