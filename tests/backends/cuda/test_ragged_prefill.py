"""The ragged paged-attention kernel (prompt chunks, prefix-extending chunks and decodes in
one batch) equals the CPU oracle and dense causal attention: under the Pallas interpreter in
float32 here, compiled by Triton in bfloat16 where a GPU is present."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.cuda.backend import CudaBackend
from backends.gpu.kernels.ragged_prefill import (
    BLOCK_SIZES,
    BlockSizes,
    block_table,
    ragged_paged_attention,
)
from engine.attention import AttentionMetadata
from tests.backends.ragged_batches import make_case

ON_GPU = jax.default_backend() == "gpu"
SMALL = BlockSizes(block_q=16, block_k=16, num_warps=4, num_stages=2)
MID = BlockSizes(block_q=32, block_k=32, num_warps=4, num_stages=2)


def head_major(cache):
    return np.ascontiguousarray(cache.transpose(2, 0, 1, 3))  # [Hkv, pages, page, D]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def run_kernel(case, scale, sizes, interpret):
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    return np.asarray(ragged_paged_attention(case.q, kh, vh, case.md, scale=scale,
                                             interpret=interpret, sizes=sizes))


def run_oracle(case, scale):
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    return np.asarray(jax.jit(lambda q, k, v: oracle(q, k, v, case.md, scale=scale,
                                                     head_major=True))(case.q, kh, vh))


CASES = {
    # name: (kv_lens, q_lens, page, hq, hkv, d, pad_seqs, sizes)
    "fresh_prompts_mha": ([37, 16, 5], [37, 16, 5], 8, 4, 4, 64, 1, SMALL),
    "prefix_chunks_mid_page_gqa": ([45, 70], [20, 33], 16, 8, 2, 128, 0, SMALL),
    "mixed_with_decodes": ([50, 9, 1, 64, 23], [50, 1, 1, 30, 1], 32, 8, 2, 64, 2, MID),
    "page8_four_pages_a_block": ([100, 3], [60, 3], 8, 4, 4, 128, 1, MID),
    "page_larger_than_block_k": ([70, 33, 2], [40, 33, 1], 32, 4, 1, 64, 1, SMALL),
    "default_block_sizes": ([150, 20, 7], [140, 1, 7], 16, 4, 1, 64, 2, BLOCK_SIZES),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_oracle_interpreted(name):
    kv_lens, q_lens, page, hq, hkv, d, pad_seqs, sizes = CASES[name]
    rng = np.random.default_rng(len(name))
    case = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, page_size=page, hq=hq, hkv=hkv,
                     d=d, pad_seqs=pad_seqs)
    scale = d**-0.5
    got = run_kernel(case, scale, sizes, interpret=True)
    want = run_oracle(case, scale)
    n = case.num_tokens
    assert n < got.shape[0], "the cases keep some padding tokens"
    np.testing.assert_allclose(got[:n], want[:n], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[:n], case.expected[:n], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(got[n:], 0)  # padding rows are written, as zeros


def test_block_table_covers_each_token_once():
    """Every token (real or padding) is in exactly one block; a block stays inside one
    sequence at consecutive positions; the longest K/V comes first."""
    rng = np.random.default_rng(3)
    bq, t = 16, 160
    q_lens = [40, 1, 16, 17, 0, 1, 33]
    kv_lens = [q + int(rng.integers(0, 50)) for q in q_lens]
    n_tok = sum(q_lens)
    s_pad = len(q_lens) + 2
    qs = np.full(s_pad + 1, n_tok, np.int32)
    qs[:len(q_lens)] = np.cumsum([0, *q_lens[:-1]])
    seq_lens = np.zeros(s_pad, np.int32)
    seq_lens[:len(kv_lens)] = kv_lens
    meta = np.asarray(jax.jit(block_table, static_argnums=(2, 3))(qs, seq_lens, t, bq))
    assert meta.shape == (t // bq + s_pad + 1, 4)
    owner = np.full(t, -1)
    for i, (tok0, rows, pos0, seq) in enumerate(meta):
        assert 0 <= rows <= bq
        if rows == 0:
            continue
        assert (owner[tok0:tok0 + rows] == -1).all()
        owner[tok0:tok0 + rows] = i
        if tok0 >= n_tok:  # the padding: no K/V
            assert pos0 == -1
            continue
        assert qs[seq] <= tok0 and tok0 + rows <= qs[seq + 1]
        assert pos0 == seq_lens[seq] - q_lens[seq] + (tok0 - qs[seq])
    assert (owner >= 0).all()
    ends = np.where(meta[:, 1] > 0, meta[:, 2] + meta[:, 1], -1)
    assert (np.diff(ends[meta[:, 2] >= 0]) <= 0).all()


@pytest.mark.parametrize("options,d", [
    ({}, 32),  # chunks through the ragged kernel, decodes through the decode kernel
    ({"verify_decode": False}, 32),  # decodes alone through the decode kernel
    ({"mixed_decode": False}, 32),  # everything through the ragged kernel
    ({"prefill_kernel": False}, 32),  # plain JAX
    ({}, 24),  # no power of two: plain JAX
])
def test_backend_mixed_step_matches_oracle(options, d):
    """The backend's mixed-batch path: decodes (one query token, one with a 1-token K/V),
    a fresh prompt, a prefix-extending chunk and padding sequences in one step."""
    rng = np.random.default_rng(5)
    case = make_case(rng, kv_lens=[21, 1, 40, 33, 70], q_lens=[21, 1, 9, 1, 1], page_size=8,
                     hq=4, hkv=2, d=d, pad_seqs=2)
    be = CudaBackend({"interpret": not ON_GPU, **options})
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    got = np.asarray(be.attention(case.q, kh, vh, case.md, scale=d**-0.5))
    n = case.num_tokens
    tol = 2e-3 if ON_GPU else 2e-5  # float32 dots run in TF32 on the GPU
    np.testing.assert_allclose(got[:n], case.expected[:n], atol=tol, rtol=tol)
    assert np.isfinite(got).all()


def test_backend_verify_step_matches_oracle():
    """Speculative verification in a mixed step: decodes with 4 drafts (5 query tokens, one
    starting mid-page) beside a plain decode, a prompt chunk and padding sequences; the
    short sequences take the decode kernel a token at a time (small token buckets)."""
    rng = np.random.default_rng(6)
    case = make_case(rng, kv_lens=[40, 70, 9, 33, 5], q_lens=[5, 5, 1, 20, 5], page_size=8,
                     hq=4, hkv=2, d=32, pad_seqs=2)
    be = CudaBackend({"interpret": not ON_GPU})
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    got = np.asarray(be.attention(case.q, kh, vh, case.md, scale=32**-0.5))
    n = case.num_tokens
    tol = 2e-3 if ON_GPU else 2e-5
    np.testing.assert_allclose(got[:n], case.expected[:n], atol=tol, rtol=tol)


def test_backend_rejects_an_unknown_decode_kernel():
    with pytest.raises(ValueError, match="decode_impl='flash'.*'jax'.*'gqa'"):
        CudaBackend({"decode_impl": "flash"})


def test_block_table_skips_sequences():
    """Skipped sequences get no blocks; the others are listed as without the skip."""
    qs = np.array([0, 20, 21, 30, 31, 31], np.int32)
    seq_lens = np.array([20, 5, 9, 40, 0], np.int32)
    skip = np.array([False, True, False, True, False])
    f = jax.jit(block_table, static_argnums=(2, 3))
    meta = np.asarray(f(qs, seq_lens, 48, 16, skip))
    live = meta[(meta[:, 1] > 0) & (meta[:, 2] >= 0)]
    assert sorted(live[:, 3].tolist()) == [0, 0, 2]  # 20 rows in 2 blocks, then 9 rows
    assert live[:, 1].sum() == 20 + 9
    assert not np.isin([20, 30], live[:, 0]).any()


def prompt_batch(rng, q_lens, *, page, hq, hkv, d, dtype, cached=None):
    """Sequences with cached[s] tokens already in the cache and q_lens[s] new ones (bf16
    GPU tests: too large for make_case's float64 dense reference)."""
    cached = cached or [0] * len(q_lens)
    kv_lens = [c + q for c, q in zip(cached, q_lens, strict=True)]
    pages_per = [-(-n // page) for n in kv_lens]
    num_pages = sum(pages_per) + 1
    perm = rng.permutation(num_pages).astype(np.int32)
    t = -(-sum(q_lens) // 128) * 128
    page_table = np.zeros((len(q_lens), max(pages_per)), np.int32)
    positions = np.zeros(t, np.int32)
    token_seq = np.zeros(t, np.int32)
    query_start = np.full(len(q_lens) + 1, sum(q_lens), np.int32)
    off = nxt = 0
    for s, (c, q) in enumerate(zip(cached, q_lens, strict=True)):
        page_table[s, :pages_per[s]] = perm[nxt:nxt + pages_per[s]]
        nxt += pages_per[s]
        query_start[s] = off
        positions[off:off + q] = np.arange(c, c + q)
        token_seq[off:off + q] = s
        off += q
    md = AttentionMetadata(positions=positions, slot_mapping=np.zeros(t, np.int32),
                           token_seq=token_seq, query_start=query_start,
                           seq_lens=np.asarray(kv_lens, np.int32), page_table=page_table,
                           num_tokens=np.int32(sum(q_lens)), page_size=page)
    q = jnp.asarray(rng.standard_normal((t, hq, d), np.float32), dtype)
    k = jnp.asarray(rng.standard_normal((hkv, num_pages, page, d), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((hkv, num_pages, page, d), np.float32), dtype)
    return q, k, v, md


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("q_lens,cached", [
    ([8192], [0]),  # one 8k prompt
    ([700, 1, 100, 1, 333, 1024], [0, 80, 207, 1500, 0, 30]),  # mixed, prefixes mid-page
])
def test_kernel_bf16_on_gpu(q_lens, cached):
    rng = np.random.default_rng(sum(q_lens))
    q, k, v, md = prompt_batch(rng, q_lens, page=16, hq=32, hkv=8, d=128,
                               dtype=jnp.bfloat16, cached=cached)
    scale = 128**-0.5
    got = np.asarray(ragged_paged_attention(q, k, v, md, scale=scale), np.float32)
    want = np.asarray(jax.jit(lambda q, k, v: oracle(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), md,
        scale=scale, head_major=True))(q, k, v))
    n = sum(q_lens)
    assert rel_err(got[:n], want[:n]) < 1e-2
    np.testing.assert_array_equal(got[n:], 0)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("sizes", [SMALL, MID, dataclasses.replace(BLOCK_SIZES, block_q=64)])
def test_kernel_block_sizes_on_gpu(sizes):
    """Small tiles compile and stay exact-ish (float32 inputs: TF32 dots)."""
    rng = np.random.default_rng(9)
    case = make_case(rng, kv_lens=[150, 9, 1, 64, 300], q_lens=[150, 1, 1, 30, 77],
                     page_size=16, hq=8, hkv=2, d=64, pad_seqs=2)
    got = run_kernel(case, 0.125, sizes, interpret=False)
    n = case.num_tokens
    assert rel_err(got[:n], case.expected[:n]) < 2e-3
