"""--kv-cache-dtype fp8 through the engine: the builder allocates the pool in float8_e4m3fn
and the CPU backend (the oracle) decodes from it; on a tiny model its greedy tokens are the
float32 cache's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from engine import LLM, SamplingParams
from tests.models.hf_reference import make_hf_model


def test_fp8_kv_cache_engine_matches_float32_cache(tmp_path):
    make_hf_model("qwen3", seed=4).save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18, 28], list(range(40, 75))]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = dict(backend="cpu", dtype="float32", max_total_tokens=512, max_running_requests=4,
                chunked_prefill_size=32, page_size=4)
    ref = LLM(str(tmp_path), **opts)
    fp8 = LLM(str(tmp_path), kv_cache_dtype="fp8", **opts)
    kv_dtypes = {a.dtype for a in jax.tree.leaves(fp8.engine.runner.kv)}
    assert kv_dtypes == {jnp.dtype(jnp.float8_e4m3fn)}
    got, want = fp8.generate(prompts, sp), ref.generate(prompts, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_backend_without_fp8_kv_refuses_it():
    """A backend whose attention cannot read e4m3 says so before anything is built."""
    from engine.builder import build_engine
    from engine.config import EngineConfig

    config = EngineConfig.build(backend="npu", npu_device="cpu", kv_cache_dtype="fp8",
                                load_format="dummy", model="smollm2-135m")
    with pytest.raises(ValueError, match="cannot read an fp8 KV cache"):
        build_engine(config)
