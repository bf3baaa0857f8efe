"""Speculative decoding end to end: with drafts verified in the target's step, every output
equals the engine's without speculation, token for token (greedy, and seeded sampling: each
verified row samples with the noise a plain step uses there; logprobs up to rounding), and
the sampled distribution is the model's (a chi-square test over seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jax.scipy.stats import chi2

from engine import LLM, SamplingParams
from tests.bench.test_offline_bench import TINY

SMALL = dict(backend="cpu", max_total_tokens=8192, max_running_requests=16,
             chunked_prefill_size=256)
TEXT = ("The quick brown fox jumps over the lazy dog. It was a sunny day in the park and the "
        "children played near the old oak tree while their parents talked.")
REWRITE = f"Repeat the following text exactly.\nText: {TEXT}\nRepeated text:"


@pytest.fixture(scope="module")
def spec_llm(default_gguf):  # the default_llm fixture's settings
    return LLM(speculative_algorithm="ngram", speculative_num_draft_tokens=4,
               speculative_max_batch=16, speculative_adaptive=False, **SMALL)


def outputs(outs) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def test_smollm2_outputs_equal_without_speculation(spec_llm) -> None:
    prompts = [REWRITE, "1, 2, 3, 4,"]
    params = [SamplingParams(max_tokens=28, temperature=0),
              SamplingParams(max_tokens=20, temperature=0, stop=[" 9,"], min_tokens=3)]
    eng = spec_llm.engine
    proposer, eng.proposer = eng.proposer, None  # speculation off: the same engine otherwise
    plain = spec_llm.generate(prompts, params)
    eng.proposer = proposer
    before = eng.scheduler.stats()
    spec = spec_llm.generate(prompts, params)
    assert outputs(spec) == outputs(plain)
    assert spec[1].outputs[0].finish_reason == "stop"  # the stop string cut the run
    stats = spec_llm.engine.scheduler.stats()
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    assert accepted >= 10  # it did speculate, and some drafts were rejected
    assert stats.num_draft_tokens - before.num_draft_tokens > accepted
    assert stats.kv_pages_used == 0


def tiny(tmp_path: Path, vocab: int = 512, **kw) -> LLM:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "vocab_size": vocab}))
    # Speculation on whenever it may (these tests check the mechanism, not whether it pays).
    opts = dict(backend="cpu", load_format="dummy", max_total_tokens=2048,
                max_running_requests=64, chunked_prefill_size=256, speculative_adaptive=False)
    return LLM(str(config), **{**opts, **kw})


SPEC = dict(speculative_algorithm="ngram", speculative_max_batch=64)


def test_tiny_preemption_overlap_n_logprobs_and_abort_keep_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 30, size=int(n)).tolist() for n in (20, 7, 12, 25)]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=1, ignore_eos=True, n=n,
                             logprobs=lp)
              for m, t, n, lp in ((30, 0, 1, None), (40, 1.0, 2, 2), (20, 0, 1, None),
                                  (30, 0, 1, None))]
    plain = tiny(tmp_path).generate(prompts, params)
    want = outputs(plain)
    # 5 pages of 16 tokens for 5 sequences of up to 55: they preempt each other; overlapped
    # steps while more than 2 run, speculative ones (synchronous) once 2 or fewer do.
    small = tiny(tmp_path, max_total_tokens=80, overlap_schedule=True,
                 speculative_algorithm="ngram", speculative_max_batch=2)
    spec = small.generate(prompts, params)
    assert outputs(spec) == want
    for a, b in zip(plain[1].outputs, spec[1].outputs, strict=True):  # equal up to rounding
        assert [sorted(d) for d in b.logprobs] == [sorted(d) for d in a.logprobs]
        assert max(abs(d[t] - e[t]) for d, e in zip(a.logprobs, b.logprobs, strict=True)
                   for t in d) < 1e-4
    stats = small.engine.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.num_accepted_tokens > 0
    assert stats.kv_pages_used == 0
    eng = small.engine  # abort while drafts are in flight: every page comes back
    rid = eng.add_request(prompts[0], params[0])
    while eng.scheduler.stats().num_draft_tokens == stats.num_draft_tokens:
        eng.step()
    eng.abort(rid)
    assert eng.scheduler.stats().kv_pages_used == 0 and not eng.has_unfinished()


def test_tiny_draft_model_same_weights_and_a_smaller_one(tmp_path: Path) -> None:
    """A draft of the target's own weights proposes what the target then computes (greedy:
    every draft accepted, in float32); a smaller random draft is mostly rejected. Outputs equal
    the plain engine's either way, prompts longer than a step's budget included."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 40, size=int(n)).tolist() for n in (20, 90, 7)]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=2, ignore_eos=True)
              for m, t in ((30, 0), (20, 0), (25, 0.8))]
    opts = dict(chunked_prefill_size=64, max_running_requests=16)
    want = outputs(tiny(tmp_path, **opts).generate(prompts, params))
    small = tmp_path / "draft" / "config.json"
    small.parent.mkdir()
    small.write_text(json.dumps({**TINY, "hidden_size": 32, "num_hidden_layers": 1}))
    rates = []
    for draft in (tmp_path / "config.json", small):
        llm = tiny(tmp_path, speculative_algorithm="draft", speculative_draft_model=str(draft),
                   speculative_max_batch=16, **opts)
        assert outputs(llm.generate(prompts[:2], params[:2])) == want[:2]  # greedy
        rates.append(llm.engine.scheduler.stats().spec_acceptance_rate)
        assert outputs(llm.generate(prompts, params)) == want
        assert llm.engine.scheduler.stats().kv_pages_used == 0
    assert rates[0] == 1.0 and rates[1] < 0.3, rates  # float32: the same argmax


def test_tiny_sampled_distribution_is_the_models(tmp_path: Path) -> None:
    """Seeds 0..N-1 at temperature 0.5 over a 16-token vocabulary: the tokens equal a plain
    engine's seed for seed, and the third output token's frequencies fit the model's exact
    marginal (from its logprobs over all 16 tokens; chi-square, p > 0.001)."""
    V, N, T = 16, 480, 0.5
    prompt = [3, 5, 7, 3, 5, 9, 3, 5, 7, 3, 5]
    sp = [SamplingParams(max_tokens=3, temperature=T, seed=s, ignore_eos=True)
          for s in range(N)]
    plain = tiny(tmp_path, vocab=V, max_running_requests=16)
    spec = tiny(tmp_path, vocab=V, max_running_requests=16, **SPEC)
    got, want = [], []
    for i in range(0, N, 8):  # 8 at a time: 8 rows of 16 are left for drafts
        got += [o.outputs[0].token_ids for o in spec.generate([prompt] * 8, sp[i:i + 8])]
        want += [o.outputs[0].token_ids for o in plain.generate([prompt] * 8, sp[i:i + 8])]
    assert got == want
    stats = spec.engine.scheduler.stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # accepted and rejected

    def probs(prefixes: list[list[int]]) -> np.ndarray:  # [P, V] next-token distributions
        lp = SamplingParams(max_tokens=1, temperature=0, logprobs=V, ignore_eos=True)
        outs = plain.generate([prompt + p for p in prefixes], lp)
        table = np.zeros((len(prefixes), V))
        for i, o in enumerate(outs):
            for tok, v in o.outputs[0].logprobs[0].items():
                table[i, tok] = v
        return np.exp(table / T - np.logaddexp.reduce(table / T, axis=1, keepdims=True))

    p0 = probs([[]])[0]  # [V], at temperature T
    p1 = probs([[a] for a in range(V)])  # [V, V]: p(b | a)
    p2 = probs([[a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)  # p(c | a, b)
    marginal = np.einsum("a,ab,abc->c", p0, p1, p2)  # [V]
    observed = np.bincount([t[2] for t in got], minlength=V)
    expected = N * marginal
    keep = expected >= 5  # the chi-square approximation's usual condition; the rest pooled
    obs, exp = observed[keep], expected[keep]
    if not keep.all():
        obs, exp = np.append(obs, observed[~keep].sum()), np.append(exp, expected[~keep].sum())
    exp = exp * obs.sum() / exp.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert float(chi2.sf(stat, len(obs) - 1)) > 1e-3, (obs, exp.round(1))
