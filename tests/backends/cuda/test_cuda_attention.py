"""The CUDA backend's attention equals the CPU oracle: the Pallas decode kernel (under the
Pallas interpreter here; compiled by Triton where a GPU is present) and the mixed-batch path
over the head-major cache, plus its KV writes."""

import dataclasses

import jax
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention
from backends.cuda.backend import CudaBackend
from backends.gpu.kernels.gqa_decode import gqa_decode_attention, split_tokens
from backends.gpu.kernels.paged_decode import paged_decode_attention, partition, table_width
from tests.backends.ragged_batches import make_case

ON_GPU = jax.default_backend() == "gpu"
# Triton's float32 dots run in TF32 on the GPU (relative error near 3e-4); exact elsewhere.
REL_TOL = 2e-3 if ON_GPU else 1e-5


def assert_close(got, want):
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < REL_TOL, f"relative error {err:.2e}"


def head_major(cache):
    return np.ascontiguousarray(cache.transpose(2, 0, 1, 3))  # [Hkv, pages, page, D]


def decode_case(seed, n_seqs, page_size, hq, hkv, d, max_len=70):
    rng = np.random.default_rng(seed)
    kv_lens = rng.integers(1, max_len, size=n_seqs).tolist()
    case = make_case(rng, kv_lens=kv_lens, q_lens=[1] * n_seqs, page_size=page_size, hq=hq,
                     hkv=hkv, d=d, pad_seqs=3)
    # Page tables padded to a power of two, as the runner's buckets do.
    pt = case.md.page_table
    p = 1 << (pt.shape[1] - 1).bit_length()
    md = dataclasses.replace(case.md, page_table=np.pad(pt, ((0, 0), (0, p - pt.shape[1]))),
                             decode_only=True)
    return case, md


@pytest.mark.parametrize("impl", ["jax", "gqa"])
@pytest.mark.parametrize("seed,n_seqs,page_size,hq,hkv,d", [
    (0, 5, 16, 8, 2, 64), (1, 3, 4, 4, 4, 32), (2, 9, 8, 16, 2, 128), (3, 1, 16, 32, 8, 128),
    (4, 6, 1, 8, 4, 64), (5, 2, 2, 12, 4, 128),
])
def test_decode_kernel_matches_oracle(seed, n_seqs, page_size, hq, hkv, d, impl):
    case, md = decode_case(seed, n_seqs, page_size, hq, hkv, d)
    scale = d**-0.5
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    want = np.asarray(jax.jit(lambda q, k, v: ragged_paged_attention(
        q, k, v, md, scale=scale, head_major=True))(case.q, kh, vh))
    got = np.asarray(jax.jit(lambda q, k, v: paged_decode_attention(
        q, k, v, md, scale=scale, interpret=not ON_GPU, impl=impl))(case.q, kh, vh))
    n = case.num_tokens
    assert_close(got[:n], want[:n])
    assert_close(want[:n], case.expected[:n])


@pytest.mark.parametrize("k_splits,ppb", [(1, 2), (2, 2), (4, 1), (8, 1)])
def test_gqa_decode_kernel_splits_match_oracle(k_splits, ppb):
    """Our kernel at each split count, with sequences shorter than a split (empty splits),
    one of length 0 (output 0) and G = 4 query heads a KV head (padded to 16 rows)."""
    case, md = decode_case(7, 6, 16, 16, 4, 32, max_len=120)
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    table = np.asarray(md.page_table)
    width = -(-table.shape[1] // (k_splits * ppb)) * k_splits * ppb
    table = np.pad(table, ((0, 0), (0, width - table.shape[1])))
    lens = np.asarray(md.seq_lens).copy()
    lens[1] = 0
    s = table.shape[0]
    got = np.asarray(gqa_decode_attention(case.q[:s], kh, vh, table, lens, scale=0.2,
                                          k_splits=k_splits, pages_per_block=ppb,
                                          interpret=not ON_GPU))
    md0 = dataclasses.replace(md, seq_lens=lens)
    want = np.asarray(jax.jit(lambda q, k, v: ragged_paged_attention(
        q, k, v, md0, scale=0.2, head_major=True))(case.q, kh, vh))[:s]
    live = lens > 0
    assert_close(got[live], want[live])
    np.testing.assert_array_equal(got[~live], 0)


@pytest.mark.parametrize("width,k_splits,ppb", [(16, 4, 2), (64, 16, 1), (64, 2, 8)])
def test_gqa_decode_kernel_splits_follow_the_length_not_the_width(width, k_splits, ppb):
    """Tables much wider than the longest sequence (one page width for every step, page
    buckets 'max'): each sequence's context is split over all k_splits programs by its own
    length, and the result still equals the oracle."""
    case, md = decode_case(5, 4, 16, 8, 2, 32, max_len=200)
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    table = np.asarray(md.page_table)
    table = np.pad(table, ((0, 0), (0, width - table.shape[1])))
    lens = np.asarray(md.seq_lens)
    s = table.shape[0]
    got = np.asarray(gqa_decode_attention(case.q[:s], kh, vh, table, lens, scale=0.3,
                                          k_splits=k_splits, pages_per_block=ppb,
                                          interpret=not ON_GPU))
    want = np.asarray(jax.jit(lambda q, k, v: ragged_paged_attention(
        q, k, v, md, scale=0.3, head_major=True))(case.q, kh, vh))[:s]
    live = lens > 0
    assert live.sum() >= 3 and lens.max() > 16 * ppb * k_splits // 2
    assert_close(got[live], want[live])


def test_split_tokens_cover_the_length_in_whole_blocks():
    for k_splits in (1, 2, 4, 16):
        for bk in (16, 128):
            for length in range(1, 3000, 7):
                per = split_tokens(length, k_splits, bk)
                assert per % bk == 0 and per * k_splits >= length  # every token has a split
                assert per - bk < -(-length // k_splits)  # no whole block to spare


def test_a_full_width_table_gives_each_split_the_work_of_the_narrowest_table():
    """Batch 1, 8 KV heads, page 16, an 8192-token table (page buckets 'max'): a split's
    blocks are no more than with the narrowest power-of-two table that holds the sequence
    (page buckets 'pow2'), where the splits divided the table. Splitting the table (512
    pages in 16 splits of 32) gave a 1280-token sequence 3 busy programs of 4 blocks each
    instead of 10 of one."""
    def blocks_per_split(length, width):
        ks, ppcb = partition(8, 1, width, 16)
        return -(-split_tokens(length, ks, ppcb * 16) // (ppcb * 16))
    for length in range(1, 8193, 37):
        narrow = table_width(-(-length // 16), 16)
        ks, ppcb = partition(8, 1, narrow, 16)
        assert blocks_per_split(length, 512) <= narrow // ks // ppcb
    assert blocks_per_split(1280, 512) == 1


@pytest.mark.parametrize("seqs, table_pages, expected", [
    (1, 128, (16, 8)),    # batch 1: as many splits as allowed, 8-page (128-token) blocks
    (8, 64, (16, 4)),     # 8 x 8 x 16 = 1024 programs; a split holds 4 pages
    (32, 64, (4, 8)),     # 8 x 32 x 4 = 1024 (the H200 sweep's best split count here)
    (128, 128, (1, 8)),   # enough sequences: no split
    (256, 64, (1, 8)),
])
def test_decode_partition_follows_the_tuned_rule(seqs, table_pages, expected):
    """8 KV heads, page 16: the rule the H200 sweep chose (see paged_decode.py)."""
    assert partition(8, seqs, table_pages, 16) == expected


@pytest.mark.parametrize("seqs", [1, 8, 256])
@pytest.mark.parametrize("page", [1, 4, 8, 16])
def test_decode_blocks_are_powers_of_two_for_any_table(seqs, page):
    """Whatever the table's width (the largest page bucket is max_model_len / page), the
    padded width splits into blocks of a power of two of at least 16 tokens."""
    for width in range(1, 300):
        w = table_width(width, page)
        assert w >= width and w & (w - 1) == 0
        ks, ppcb = partition(8, seqs, w, page)
        bk = ppcb * page
        assert w % ks == 0 and (w // ks) % ppcb == 0 and bk >= 16 and bk & (bk - 1) == 0


def test_decode_partition_keeps_blocks_of_16_tokens():
    for page in (4, 8, 16, 32):
        for width in (4, 8, 16, 64):
            ks, ppcb = partition(2, 1, width, page)
            assert width % ks == 0 and (width // ks) % ppcb == 0 and ppcb * page >= 16


def test_mixed_batch_and_kv_writes_match_oracle():
    """Prompt chunks and decodes together: write this step's K/V, then attend."""
    rng = np.random.default_rng(7)
    case = make_case(rng, kv_lens=[13, 1, 30, 7], q_lens=[13, 1, 5, 1], page_size=4, hq=8,
                     hkv=2, d=16)
    be = CudaBackend({"interpret": not ON_GPU})
    n = case.num_tokens
    k_new = rng.standard_normal((case.q.shape[0], 2, 16)).astype(np.float32)
    v_new = rng.standard_normal((case.q.shape[0], 2, 16)).astype(np.float32)
    kh, vh = jax.jit(be.write_kv)(head_major(case.k_cache), head_major(case.v_cache), k_new,
                                  v_new, case.md.slot_mapping)
    # The same writes in the standard layout, by hand.
    kc, vc = case.k_cache.copy(), case.v_cache.copy()
    slots = case.md.slot_mapping[:n]
    kc.reshape(-1, 2, 16)[slots] = k_new[:n]
    vc.reshape(-1, 2, 16)[slots] = v_new[:n]
    np.testing.assert_array_equal(np.asarray(kh), head_major(kc))
    np.testing.assert_array_equal(np.asarray(vh), head_major(vc))
    got = np.asarray(be.attention(case.q, kh, vh, case.md, scale=0.25))
    want = np.asarray(ragged_paged_attention(case.q, kc, vc, case.md, scale=0.25))
    assert_close(got[:n], want[:n])


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
def test_decode_kernel_bf16_on_gpu():
    case, md = decode_case(11, 64, 16, 32, 8, 128, max_len=2048)
    kh = head_major(case.k_cache).astype(jax.numpy.bfloat16)
    vh = head_major(case.v_cache).astype(jax.numpy.bfloat16)
    q = case.q.astype(jax.numpy.bfloat16)
    got = np.asarray(paged_decode_attention(q, kh, vh, md, scale=128**-0.5), np.float32)
    n = case.num_tokens
    err = np.linalg.norm(got[:n] - case.expected[:n]) / np.linalg.norm(case.expected[:n])
    assert err < 1e-2
