"""The serving core with the real model: prefix cache and preemption never change outputs."""

import pytest

from engine import LLM, SamplingParams

SYSTEM = ("You are a careful assistant. Answer briefly and precisely, and never make up facts. "
          "If you do not know, say so. ") * 3
QUESTIONS = ["What is two plus two?", "Name a color.", "What is the opposite of hot?",
             "Which animal barks?", "How many days are in a week?", "What do bees make?"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def run(llm: LLM, prompts: list[str]):
    before = llm.engine.scheduler.stats()
    outs = llm.generate(prompts, GREEDY)
    after = llm.engine.scheduler.stats()
    return outs, after.num_computed_tokens - before.num_computed_tokens


@pytest.fixture(scope="module")
def prompts():
    return [SYSTEM + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def no_cache_llm(default_gguf):
    return LLM(backend="cpu", max_total_tokens=8192, max_running_requests=16,
               chunked_prefill_size=256, disable_radix_cache=True)


def test_prefix_cache_saves_compute_and_keeps_outputs(default_llm, no_cache_llm, prompts):
    default_llm.engine.scheduler.flush_cache()
    base, base_computed = run(no_cache_llm, prompts)
    # Warm the cache with the shared system prompt, then run the same workload.
    default_llm.generate(SYSTEM + "Hello.", GREEDY)
    cached, cached_computed = run(default_llm, prompts)
    assert [o.token_ids for o in cached] == [o.token_ids for o in base]
    assert all(o.num_cached_tokens > 0 for o in cached)
    assert all(o.num_cached_tokens == 0 for o in base)
    system_len = len(default_llm.tokenizer.encode(SYSTEM))
    assert cached_computed <= base_computed - (len(prompts) * system_len) // 2
    stats = default_llm.engine.scheduler.stats()
    assert stats.prefix_hit_tokens > 0 and 0 < stats.prefix_hit_rate <= 1


def test_tiny_pool_preempts_but_outputs_match(no_cache_llm, prompts, default_gguf):
    distinct = [f"Question {i}. {p}" for i, p in enumerate(prompts)]  # no shared pages
    ample, _ = run(no_cache_llm, distinct)
    # ~85 prompt + 10 output tokens need 6 pages each: 10 pages of 16 cannot hold two.
    tiny = LLM(backend="cpu", max_total_tokens=160, max_running_requests=6,
               chunked_prefill_size=64)
    outs, _ = run(tiny, distinct)
    assert tiny.engine.scheduler.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ample]
    tiny.engine.scheduler.flush_cache()
    assert tiny.engine.scheduler.pool.num_free == tiny.engine.scheduler.pool.num_pages


def test_request_larger_than_the_pool_is_refused(default_gguf):
    tiny = LLM(backend="cpu", max_total_tokens=64, max_running_requests=4,
               chunked_prefill_size=64)
    with pytest.raises(ValueError, match="maximum context length|pages"):
        tiny.generate("word " * 100, SamplingParams(max_tokens=4))
    assert not tiny.engine.has_unfinished()
