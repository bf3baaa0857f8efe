"""Sampler tests against numpy references on a small vocabulary.

Each SamplingMode compiles once (the jitted sampler is shared); rows are padded to one bucket.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import (
    SampleOutput,
    SamplingMode,
    SamplingRow,
    SamplingTensors,
    apply_penalties,
    argmax_last,
    sample,
)
from engine.sampling_params import SamplingParams

V = 32
S = 8
_sample = jax.jit(sample, static_argnames="mode")


def run(logits: np.ndarray, rows: list[SamplingRow], mode: SamplingMode | None = None):
    """Sample rows (logits [n, V]) padded to S rows; returns numpy outputs for the real rows."""
    n = len(rows)
    padded = np.zeros((S, V), np.float32)
    padded[:n] = logits
    mode = mode or SamplingMode.from_rows(rows)
    t = SamplingTensors.from_rows(rows, V, S, mode)
    out: SampleOutput = _sample(padded, t, mode)
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)


def row(seed: int = 0, step: int = 0, prompt=None, output=None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), seed, step, prompt, output)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def allowed_set(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float):
    # -> (allowed token ids, full temperature-scaled distribution)
    """Reference: min-p on the full distribution, then top-k, then top-p on what is left."""
    p = softmax(logits.astype(np.float64) / temperature)
    order = np.argsort(-p, kind="stable")
    keep = [int(i) for i in order if p[i] >= min_p * p.max()]
    if top_k > 0:
        keep = keep[:top_k]
    q = p[keep] / p[keep].sum()
    kept, mass = [], 0.0
    for tok, qi in zip(keep, q, strict=True):
        kept.append(tok)
        mass += qi
        if mass >= top_p:  # the token that crosses top_p is kept, then stop
            break
    return set(kept), p


FILTERS = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.6),
    dict(temperature=1.3, min_p=0.2),
    dict(temperature=1.0, top_k=6, top_p=0.85),
    dict(temperature=1.3, top_p=0.8, min_p=0.1),  # top-p renormalizes after min-p
    dict(temperature=2.0, top_p=0.9),
]


@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_filters_keep_exactly_the_allowed_set(kw):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (V,)).astype(np.float32)
    allowed, p = allowed_set(logits, kw["temperature"], kw.get("top_k", -1),
                             kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    assert 1 < len(allowed) < V  # the filter actually removes tokens
    for name, off in (("top_k", -1), ("top_p", 1.0), ("min_p", 0.0)):
        if name in kw:  # each filter binds: dropping it changes the allowed set
            loose = {**dict(top_k=-1, top_p=1.0, min_p=0.0), **kw, name: off}
            del loose["temperature"]
            assert allowed_set(logits, kw["temperature"], **loose)[0] != allowed, name
    seen: set[int] = set()
    rows = [row(seed=s, **kw) for s in range(S)]
    mode = SamplingMode.from_rows(rows)
    for batch in range(40):  # 320 draws
        rows = [row(seed=1000 * batch + s, **kw) for s in range(S)]
        tokens = run(np.tile(logits, (S, 1)), rows, mode).tokens
        seen.update(int(x) for x in tokens)
    assert seen <= allowed, f"drew tokens outside the allowed set: {seen - allowed}"
    renorm = p[list(allowed)] / p[list(allowed)].sum()
    likely = {tok for tok, q in zip(allowed, renorm, strict=True) if q > 0.02}
    assert likely <= seen, f"never drew allowed tokens {likely - seen}"


def test_top_p_keeps_the_token_that_crosses_p():
    logits = np.full(V, -np.inf, np.float32)
    logits[:4] = np.log([0.5, 0.3, 0.15, 0.05])
    # Cumulative 0.5, 0.8, 0.95, 1.0: the token whose mass crosses top_p is kept.
    cases = [(0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3})]
    for top_p, expect in cases:
        ref, _ = allowed_set(logits, 1.0, -1, top_p, 0.0)
        assert ref == expect, (top_p, ref)
        seen: set[int] = set()
        for batch in range(30):
            rows = [row(seed=batch * S + s, top_p=top_p) for s in range(S)]
            seen.update(int(x) for x in run(np.tile(logits, (S, 1)), rows).tokens)
        assert seen == expect, (top_p, seen)


def test_greedy_is_argmax_and_skips_randomness():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (5, V)).astype(np.float32)
    rows = [row(seed=s, step=s, temperature=0.0) for s in range(5)]
    mode = SamplingMode.from_rows(rows)
    assert mode.all_greedy and not mode.filters
    np.testing.assert_array_equal(run(logits, rows).tokens, logits.argmax(-1))
    # Greedy rows inside a mixed (sampling) batch still take the argmax.
    mixed = rows[:3] + [row(seed=9, top_k=3), row(seed=8, top_p=0.5)]
    out = run(logits, mixed).tokens
    np.testing.assert_array_equal(out[:3], logits[:3].argmax(-1))


def penalties_reference(logits, prompt, output, rep, pres, freq):
    x = logits.astype(np.float64).copy()
    counts = np.bincount(output, minlength=V)
    seen = (np.bincount(prompt, minlength=V) > 0) | (counts > 0)
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    return x - freq * counts - pres * (counts > 0)


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(2)
    cases = [  # (repetition, presence, frequency)
        (1.7, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 1.2), (0.6, -0.5, 0.8), (1.3, 2.0, -2.0),
    ]
    logits = rng.normal(0, 3, (len(cases), V)).astype(np.float32)
    prompts = [list(rng.integers(0, V, 6)) for _ in cases]
    outputs = [list(rng.integers(0, V, 10)) for _ in cases]
    rows = [
        row(0, 0, prompt, output, repetition_penalty=rep, presence_penalty=pres,
            frequency_penalty=freq)
        for (rep, pres, freq), prompt, output in zip(cases, prompts, outputs, strict=True)
    ]
    t = SamplingTensors.from_rows(rows, V, len(rows))
    got = np.asarray(apply_penalties(jnp.asarray(logits), jax.tree.map(jnp.asarray, t)))
    for i, (rep, pres, freq) in enumerate(cases):
        ref = penalties_reference(logits[i], prompts[i], outputs[i], rep, pres, freq)
        assert np.abs(ref - logits[i]).max() > 0.1  # the case does penalize something
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "kw, prompt, output, want",
    [
        (dict(repetition_penalty=1.2), [3], [], 4),  # 2.0 / 1.2 < 1.9
        (dict(repetition_penalty=1.2), [], [3], 4),
        (dict(presence_penalty=0.2), [3], [], 3),  # presence counts the output only
        (dict(presence_penalty=0.2), [], [3], 4),
        (dict(frequency_penalty=0.05), [], [3], 3),  # 2.0 - 0.05 > 1.9
        (dict(frequency_penalty=0.05), [], [3, 3, 3], 4),  # 2.0 - 0.15 < 1.9
    ],
)
def test_penalties_change_the_greedy_choice(kw, prompt, output, want):
    logits = np.zeros((1, V), np.float32)
    logits[0, 3], logits[0, 4] = 2.0, 1.9
    assert run(logits, [row(0, 0, prompt, output, temperature=0.0, **kw)]).tokens[0] == want


def test_logit_bias_moves_the_argmax():
    logits = np.zeros((2, V), np.float32)
    logits[:, 0] = 5.0
    rows = [row(temperature=0.0, logit_bias={7: 10.0}), row(temperature=0.0, logit_bias={0: -9.0})]
    out = run(logits, rows)
    assert out.tokens[0] == 7
    assert out.tokens[1] != 0
    # Logprobs stay those of the raw logits (bias not applied).
    np.testing.assert_allclose(out.logprobs[0], log_softmax(logits[0])[7], atol=1e-5)


def test_seeded_sampling_is_batch_invariant():
    rng = np.random.default_rng(3)
    mine = rng.normal(0, 1, (V,)).astype(np.float32)
    kw = dict(temperature=1.0, top_p=0.95)

    def tokens_over_steps(batch_of: int, position: int, steps: int = 6) -> list[int]:
        got = []
        for step in range(steps):
            logits = rng.normal(0, 1, (batch_of, V)).astype(np.float32)
            rows = [row(seed=77 + i, step=step, temperature=0.8, top_k=4) for i in range(batch_of)]
            logits[position], rows[position] = mine, row(seed=12345, step=step, **kw)
            got.append(int(run(logits, rows).tokens[position]))
        return got

    alone = tokens_over_steps(1, 0)
    assert tokens_over_steps(5, 3) == alone
    assert tokens_over_steps(S, S - 1) == alone
    assert len(set(alone)) > 1  # steps draw different tokens
    # Same seed and step under the no-sort program (no row uses top-k/top-p) vs the sorted one.
    plain = [row(seed=5, step=s, temperature=1.0) for s in range(S)]
    assert not SamplingMode.from_rows(plain).filters
    logits = np.tile(mine, (S, 1))
    a = run(logits, plain).tokens
    b = run(logits, plain, SamplingMode(all_greedy=False, filters=True)).tokens
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ_and_large_seeds_work():
    logits = np.zeros((S, V), np.float32)  # uniform: any token
    # Seeds equal in their low 32 bits must still differ.
    seeds = (0, 1, 2, 2**32 + 1, 2**33 + 1, 2**40 + 1, 2**63 + 1, 2**64 - 1)
    per_seed = np.stack([
        run(logits, [row(seed=s, step=step, temperature=1.0) for s in seeds]).tokens
        for step in range(4)
    ], axis=1)  # [seeds, steps]
    assert len({tuple(x) for x in per_seed.tolist()}) == len(seeds)
    again = run(logits, [row(seed=s, step=2, temperature=1.0) for s in seeds]).tokens
    np.testing.assert_array_equal(per_seed[:, 2], again)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_are_raw_log_softmax(k):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, (3, V)).astype(np.float32)
    rows = [row(seed=1, temperature=0.5, top_k=3, repetition_penalty=2.0, prompt=[1, 2],
                output=[3], logprobs=k), row(temperature=0.0), row(seed=2, logprobs=1)]
    out = run(logits, rows)
    ref = log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(3), out.tokens], rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == (3, max(k, 1)) == out.top_logprobs.shape
    want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, : max(k, 1)]
    np.testing.assert_array_equal(out.top_ids, want_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, want_ids, -1), atol=1e-5)


def test_padding_rows_are_harmless():
    rows = [row(seed=3, step=2, temperature=1.0, top_k=2, logit_bias={1: 1.0},
                repetition_penalty=1.5, prompt=[0], output=[1, 1])]
    t = SamplingTensors.from_rows(rows, V, S)
    assert t.temperature.shape == (S,) and t.token_counts.shape == (S, V)
    np.testing.assert_array_equal(t.temperature[1:], 0.0)
    np.testing.assert_array_equal(t.top_k[1:], V)
    np.testing.assert_array_equal(t.token_counts[1:], 0)
    np.testing.assert_array_equal(t.bias_values[1:], 0.0)
    # Padding rows (zero logits) do not perturb the real one, whatever their logits are.
    logits = np.random.default_rng(5).normal(0, 1, (S, V)).astype(np.float32)
    mode = SamplingMode.from_rows(rows)
    first = np.asarray(_sample(logits, t, mode).tokens)
    logits[1:] = 1e4
    again = np.asarray(_sample(logits, t, mode).tokens)
    assert first[0] == again[0]
    x = logits[0].copy()
    x[1] += 1.0
    x = penalties_reference(x, [0], [1, 1], 1.5, 0.0, 0.0)
    assert first[0] in set(np.argsort(-x)[:2].tolist())


def test_from_rows_validates():
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.from_rows([row()] * 3, V, 2)
    with pytest.raises(ValueError, match="does not cover"):
        SamplingTensors.from_rows([row(top_k=3)], V, S, SamplingMode(all_greedy=False))
    with pytest.raises(ValueError, match="out of range"):
        SamplingTensors.from_rows([row(repetition_penalty=1.1, output=[V])], V, S)


def _primitives(mode: SamplingMode, rows: list[SamplingRow]) -> set[str]:
    """Primitive names in the sampler's program for `mode` (nested jaxprs included)."""
    t = SamplingTensors.from_rows(rows, V, S, mode)
    names: set[str] = set()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(lambda x, t: sample(x, t, mode))(np.zeros((S, V), np.float32), t).jaxpr)
    return names


_argmax_last = jax.jit(argmax_last)
_jnp_argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 1), (3, 67), (2, 49152)]), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "ties", "nan", "-inf"]))
def test_argmax_last_is_numpy_argmax(shape, seed, kind):
    """The first index of each row's max, ties and all-(-inf) rows included; where a row
    holds a NaN, its first NaN (numpy's and jnp.argmax's rule)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape).astype(np.float32)
    if kind == "ties":  # few distinct values: the max repeats
        x = rng.integers(-2, 3, shape).astype(np.float32)
    elif kind == "nan":
        x[rng.random(shape) < 0.2] = np.nan
    elif kind == "-inf":
        x[rng.random(shape) < 0.5] = -np.inf
        x[0] = -np.inf
    got = np.asarray(_argmax_last(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.argmax(-1))
    np.testing.assert_array_equal(got, np.asarray(_jnp_argmax(x)))


def test_a_greedy_batch_pays_for_no_sort_and_no_random_numbers():
    """All rows greedy: a max and a min reduction (argmax_last; no argmax primitive, which
    XLA's CPU backend runs unvectorized), no sort, no noise; the same tokens and logprobs
    as the general program (which sorts for top-k/top-p and draws noise) on the same rows."""
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    rows = [row(seed=s, step=s, temperature=0.0, logprobs=3) for s in range(S)]
    fast = SamplingMode.from_rows(rows)
    general = SamplingMode(all_greedy=False, filters=True, num_logprobs=3)
    assert fast.all_greedy and not fast.filters and general.covers(fast)
    prims = _primitives(fast, rows)
    assert "reduce_max" in prims and "reduce_min" in prims
    assert not prims & {"argmax", "sort", "random_bits", "threefry2x32"}
    assert "sort" in _primitives(general, rows)  # (the check can fail)
    a, b = run(logits, rows, fast), run(logits, rows, general)
    np.testing.assert_array_equal(a.tokens, logits.argmax(-1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_mixed_batch_without_top_k_or_top_p_does_not_sort():
    """Sampled rows without top-k/top-p beside greedy ones: no sort, and every row's token as
    under the sorting program (greedy rows: the argmax; sampled rows: the same draw)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (S, V)).astype(np.float32)
    rows = [row(seed=s, step=3, temperature=0.0 if s % 2 else 0.9) for s in range(S)]
    mode = SamplingMode.from_rows(rows)
    assert not mode.all_greedy and not mode.filters
    assert "sort" not in _primitives(mode, rows)
    a = run(logits, rows, mode).tokens
    b = run(logits, rows, SamplingMode(all_greedy=False, filters=True)).tokens
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1::2], logits[1::2].argmax(-1))
