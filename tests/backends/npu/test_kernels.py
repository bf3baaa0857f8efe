"""The NPU backend's plain-torch reference ops (the stand-ins for torch_npu's fused ops)
equal the CPU oracle on random ragged batches: decodes, fresh prompts and prompt chunks
over a cached prefix, pages in shuffled order, mid-page starts, GQA, padded tokens and
sequences. Also the fused ops themselves, where an NPU is present (marker npu)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.cpu.attention import ragged_paged_attention
from backends.npu.kernels import make_attention, make_write_kv, reference_ops
from tests.backends.ragged_batches import make_case

CASES = {  # kv_lens, q_lens, page size, Hq, Hkv
    "decode_gqa": ([37, 5, 64, 1], [1, 1, 1, 1], 16, 8, 2),
    "prompts": ([20, 7], [20, 7], 8, 4, 4),
    "chunks_over_prefix_mid_page": ([45, 30, 9], [13, 1, 9], 16, 6, 2),
    "mixed_mqa": ([3, 70, 18, 1], [2, 1, 18, 1], 4, 4, 1),
}


def torch_ops_attention(case, decode_only: bool, ops=None) -> np.ndarray:
    md = case.md
    fn = make_attention(ops or reference_ops(), scale=case.q.shape[-1] ** -0.5,
                        page_size=md.page_size, decode_only=decode_only, layered=False)
    t = lambda a: torch.from_numpy(np.asarray(a))
    out = fn(t(case.q), t(case.k_cache), t(case.v_cache), t(md.positions), t(md.slot_mapping),
             t(md.token_seq), t(md.query_start), t(md.seq_lens), t(md.page_table),
             t(md.num_tokens))
    return out.numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_attention_equals_oracle(name):
    kv_lens, q_lens, page, hq, hkv = CASES[name]
    case = make_case(np.random.default_rng(len(name)), kv_lens=kv_lens, q_lens=q_lens,
                     page_size=page, hq=hq, hkv=hkv, d=32, pad_seqs=1)
    n = case.num_tokens
    oracle = np.asarray(ragged_paged_attention(case.q, case.k_cache, case.v_cache, case.md,
                                               scale=32**-0.5))[:n]
    ours = torch_ops_attention(case, decode_only=False)
    np.testing.assert_allclose(ours[:n], oracle, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[:n], case.expected[:n], atol=2e-5, rtol=1e-5)
    assert not ours[n:].any()  # padding rows: zeros
    if all(q == 1 for q in q_lens):  # the decode op (token i is sequence i's query)
        dec = torch_ops_attention(case, decode_only=True)
        np.testing.assert_allclose(dec[:n], oracle, atol=2e-5, rtol=1e-5)


def test_reference_write_equals_engine_write_kv():
    """reshape_and_cache writes flat slots of [blocks, block, Hkv, D] as
    engine.attention.write_kv does; a slot past the cache is dropped."""
    from engine.attention import write_kv

    rng = np.random.default_rng(0)
    kc, vc = (rng.standard_normal((5, 4, 2, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((6, 2, 8)).astype(np.float32) for _ in range(2))
    slots = np.array([3, 17, 4, 0, 19, 20], np.int32)  # 20: past the last slot
    want = [np.asarray(a) for a in write_kv(jnp.asarray(kc), jnp.asarray(vc), k, v, slots)]
    tk, tv = torch.from_numpy(kc.copy()), torch.from_numpy(vc.copy())
    out = make_write_kv(reference_ops(), layered=False)(
        tk, tv, torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(slots))
    assert out[0] is tk and out[1] is tv  # in place
    np.testing.assert_array_equal(tk.numpy(), want[0])
    np.testing.assert_array_equal(tv.numpy(), want[1])


@pytest.mark.npu
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_npu_attention_equals_reference(name):
    torch_npu = pytest.importorskip("torch_npu", reason="needs torch_npu and an Ascend NPU")
    if not torch.npu.is_available():
        pytest.skip("needs an Ascend NPU")
    from backends.npu.kernels import npu_ops

    del torch_npu
    kv_lens, q_lens, page, hq, hkv = CASES[name]
    case = make_case(np.random.default_rng(1), kv_lens=kv_lens, q_lens=q_lens, page_size=128,
                     hq=hq, hkv=hkv, d=128, pad_seqs=1)
    del page
    n = case.num_tokens
    want = torch_ops_attention(case, decode_only=all(q == 1 for q in q_lens))[:n]
    got = torch_ops_attention(case, decode_only=all(q == 1 for q in q_lens), ops=npu_ops())
    np.testing.assert_allclose(got[:n], want, atol=2e-3, rtol=2e-3)
