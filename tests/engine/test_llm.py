"""The offline API on the default model: chat, n > 1, seeds, logprobs, stops, bad input."""

import json
import math

import pytest

from engine import LLM, SamplingParams
from tests.bench.test_offline_bench import TINY


def test_chat_names_paris(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_min_tokens_bans_eos_until_reached(default_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    short = default_llm.chat(msgs, SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    eos = short.token_ids[-1]
    out = default_llm.chat(msgs, SamplingParams(max_tokens=40, temperature=0.0,
                                                min_tokens=20))[0]
    assert len(out.token_ids) >= 20
    assert eos not in out.token_ids[:19]


def test_seeded_sampling_is_reproducible_across_batches(default_llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    alone = default_llm.generate("Tell me a story about", sp)[0]
    others = SamplingParams(max_tokens=8, temperature=0.8, seed=7)
    mixed = default_llm.generate(["Hi there", "Tell me a story about", "Numbers: 1 2 3"],
                                 [others, sp, others])[1]
    assert mixed.token_ids == alone.token_ids
    other_seed = default_llm.generate("Tell me a story about",
                                      SamplingParams(max_tokens=12, temperature=1.0,
                                                     top_p=0.95, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def test_n_samples_share_the_prompt(default_llm):
    prompt = "In a distant galaxy, " * 8  # several full pages of prompt
    out = default_llm.generate(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=3,
                                                      seed=5))[0]
    assert len(out.outputs) == 3
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds per sample
    assert out.num_cached_tokens >= 16  # siblings reused the first one's prompt pages


def test_logprobs_are_log_probabilities(default_llm):
    out = default_llm.generate("The sky is", SamplingParams(max_tokens=4, temperature=0.0,
                                                            logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in lp and len(lp) >= 3
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
        assert all(v <= 0.0 for v in lp.values())
        assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-4
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs, strict=True)), rel=1e-5)


def test_stop_string_truncates_text(default_llm):
    free = default_llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert " 6," in free.text, free.text
    out = default_llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0.0,
                                                             stop=[" 6"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == " 6"
    assert out.text == free.text[:free.text.index(" 6")]


def test_stop_strings_wait_for_min_tokens(default_llm):
    """A stop string ending in the first min_tokens tokens is passed over, in the text and
    in the generation alike: the first "," after them stops both."""
    prompt, m = "1, 2, 3, 4,", 4
    free = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0]
    text = lambda ids: default_llm.tokenizer.decode(ids, skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False)
    guarded = text(free.token_ids[:m])
    assert "," in guarded and free.text.startswith(guarded), free.text
    cut = free.text.index(",", len(guarded))  # the first comma in a later token's text
    k = next(k for k in range(m + 1, 17) if len(text(free.token_ids[:k])) > cut)
    out = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                      stop=[","], min_tokens=m))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == ","
    assert out.text == free.text[:cut]
    assert out.token_ids == free.token_ids[:k]  # generation ended with the text


def test_stop_token_ids_and_max_tokens(default_llm):
    free = default_llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=8, temperature=0.0))[0]
    stop_tok = free.token_ids[3]
    out = default_llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=8, temperature=0.0,
                                                             stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_tok
    assert free.finish_reason == "length" and len(free.token_ids) == 8


def test_no_max_tokens_runs_to_the_context_limit(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_model_len=40,
              max_total_tokens=256, chunked_prefill_size=32)
    out = llm.generate([list(range(1, 12))], SamplingParams(max_tokens=None, temperature=0.0,
                                                            ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (40 - 11, "length")


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "empty"),
    ([1, 2, 10**6], SamplingParams(), "outside the vocabulary"),
    ("hello", SamplingParams(max_tokens=10**6), "maximum context length"),
])
def test_bad_requests_raise_and_engine_keeps_serving(default_llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        default_llm.generate(prompt, params)
    assert not default_llm.engine.has_unfinished()
    ok = default_llm.generate("Hello", SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert len(ok.token_ids) == 2


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(n=0),
                                    dict(max_tokens=0), dict(logprobs=50)])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
