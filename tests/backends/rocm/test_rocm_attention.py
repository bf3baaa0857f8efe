"""The ROCm backend's attention equals the CPU oracle under the Pallas interpreter, with the
block sizes, splits and stages of each AMD target (backends/rocm/tuning.py) at the
presets' page size: decodes (GQA 1 to 8), fresh prompts, prefix-extending chunks and
decodes in one step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.rocm.backend import RocmBackend
from backends.rocm.tuning import TARGETS
from engine.config import EngineConfig
from tests.backends.ragged_batches import make_case

PAGE = EngineConfig.build("rocm-mi300x").cache.page_size
assert PAGE == EngineConfig.build("rocm-mi355x").cache.page_size


def head_major(cache):
    return np.ascontiguousarray(cache.transpose(2, 0, 1, 3))  # [Hkv, pages, page, D]


def check(backend, case, md, d):
    kh, vh = head_major(case.k_cache), head_major(case.v_cache)
    scale = d**-0.5
    got = np.asarray(jax.jit(lambda q, k, v: backend.attention(q, k, v, md, scale=scale))(
        case.q, kh, vh))
    want = np.asarray(jax.jit(lambda q, k, v: oracle(q, k, v, md, scale=scale,
                                                     head_major=True))(case.q, kh, vh))
    n = case.num_tokens
    for ref in (want[:n], case.expected[:n]):
        err = np.linalg.norm(got[:n] - ref) / np.linalg.norm(ref)
        assert err < 1e-5, f"relative error {err:.2e}"


# The targets differ in the decode kernel's pipeline stages, which the interpreter ignores,
# so each GQA ratio runs once, the targets alternating.
@pytest.mark.parametrize("hq,hkv,arch", [(4, 4, "gfx942"), (8, 4, "gfx950"),
                                         (8, 2, "gfx942"), (8, 1, "gfx950")])  # G = 1 to 8
def test_decode_step_matches_oracle(arch, hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    n = 5
    kv_lens = rng.integers(1, 300, size=n).tolist()
    case = make_case(rng, kv_lens=kv_lens, q_lens=[1] * n, page_size=PAGE, hq=hq, hkv=hkv,
                     d=64, pad_seqs=3)
    pt = case.md.page_table  # padded to a power of two, as the runner's buckets are
    p = 1 << (pt.shape[1] - 1).bit_length()
    md = dataclasses.replace(case.md, page_table=np.pad(pt, ((0, 0), (0, p - pt.shape[1]))),
                             decode_only=True)
    backend = RocmBackend({"interpret": True, "target": arch})
    assert backend.decode_sizes == TARGETS[arch].decode
    check(backend, case, md, 64)


@pytest.mark.parametrize("hq,hkv,arch", [(8, 2, "gfx942"), (8, 1, "gfx950")])
def test_mixed_step_matches_oracle(arch, hq, hkv):
    """A fresh prompt longer than a query block, a decode, a chunk extending a cached
    prefix mid-page, and a one-token sequence: the ragged kernel at the target's blocks
    and, for the decodes, the decode kernel."""
    rng = np.random.default_rng(hkv)
    case = make_case(rng, kv_lens=[150, 40, 70, 1], q_lens=[150, 1, 23, 1], page_size=PAGE,
                     hq=hq, hkv=hkv, d=64, pad_seqs=1)
    backend = RocmBackend({"interpret": True, "target": arch})
    assert backend.prefill_sizes == TARGETS[arch].prefill and backend.mixed_decode
    check(backend, case, case.md, 64)
