"""The CPU oracle equals dense causal attention on random mixed ragged batches."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu.attention import ragged_paged_attention
from engine.attention import write_kv
from tests.backends.ragged_batches import make_case


@st.composite
def ragged_batches(draw):
    n = draw(st.integers(1, 5))
    kv_lens = [draw(st.integers(1, 40)) for _ in range(n)]
    # A mix of decodes (1), fresh prompts (kv_len) and chunks extending a cached prefix.
    q_lens = [draw(st.sampled_from([1, kv, max(1, kv // 2)])) for kv in kv_lens]
    hkv = draw(st.sampled_from([1, 2]))
    return dict(kv_lens=kv_lens, q_lens=q_lens, page_size=draw(st.sampled_from([1, 3, 4, 16])),
                hq=hkv * draw(st.sampled_from([1, 2, 4])), hkv=hkv,
                d=draw(st.sampled_from([8, 16])), pad_seqs=draw(st.integers(0, 2)),
                seed=draw(st.integers(0, 2**31)))


_attend = jax.jit(lambda q, k, v, md: ragged_paged_attention(q, k, v, md, scale=md_scale(q)))


def md_scale(q):
    return q.shape[-1] ** -0.5


@settings(max_examples=40, deadline=None)
@given(ragged_batches())
def test_oracle_matches_dense_causal_attention(spec):
    rng = np.random.default_rng(spec.pop("seed"))
    case = make_case(rng, **spec)
    out = np.asarray(_attend(case.q, case.k_cache, case.v_cache, case.md))
    n = case.num_tokens
    np.testing.assert_allclose(out[:n], case.expected[:n], atol=1e-5, rtol=1e-4)
    assert np.isfinite(out).all()


def test_padding_tokens_do_not_write_or_disturb():
    """Padding tokens (past num_tokens, at the slot past the last page) write nothing into
    the cache, and real tokens' outputs do not depend on what the padding tokens hold."""
    rng = np.random.default_rng(0)
    case = make_case(rng, kv_lens=[5, 9], q_lens=[1, 4], page_size=4, hq=4, hkv=2, d=8)
    n, page, slots = case.num_tokens, case.md.page_size, np.asarray(case.md.slot_mapping)
    assert len(case.q) > n  # the batch has padding tokens
    k, v = rng.standard_normal((2, len(case.q), 2, 8)).astype(np.float32)  # [T, Hkv, D]
    k[n:] = v[n:] = 1e3
    got_k, got_v = write_kv(jnp.asarray(case.k_cache), jnp.asarray(case.v_cache),
                            jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    want_k, want_v = np.array(case.k_cache), np.array(case.v_cache)
    for i, slot in enumerate(slots[:n]):  # cache: [pages, page, Hkv, D]
        want_k[slot // page, slot % page], want_v[slot // page, slot % page] = k[i], v[i]
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)
    a = np.asarray(_attend(case.q, case.k_cache, case.v_cache, case.md))
    q2 = case.q.copy()
    q2[case.num_tokens:] = 1e3
    b = np.asarray(_attend(q2, case.k_cache, case.v_cache, case.md))
    np.testing.assert_array_equal(a[:case.num_tokens], b[:case.num_tokens])
