"""The CPU attention kernel (backends/cpu/kernels/attention) equals the oracle
(backends/cpu/attention.py) on random mixed ragged batches, at every ISA level this CPU runs
(lower levels forced, as ENGINE_CPU_ISA does): decode-only and mixed prompt/decode batches,
lengths across page and 16-key block boundaries, GQA groups, head dims the vector levels
take and one they leave to generic C++, with and without `layer`, float32, bfloat16 and
float8 caches, and padding tokens whose metadata points anywhere."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.cpu.backend import CpuBackend
from backends.cpu.kernels import attention as kernels
from backends.cpu.kernels import linear
from engine import envs
from tests.backends.ragged_batches import make_case

NATIVE = kernels.isa_level()
LEVELS = list(range(min(NATIVE, 2) + 1))  # generic, AVX2, AVX-512 (higher levels run AVX-512)
pytestmark = pytest.mark.skipif(NATIVE < 0, reason="the CPU kernel library is not built here")

_oracle = jax.jit(oracle, static_argnames=("scale",))
_kernel = jax.jit(kernels.kernel, static_argnames=("scale", "isa"))


@st.composite
def batches(draw):
    n = draw(st.integers(1, 5))
    kv_lens = [draw(st.integers(1, 70)) for _ in range(n)]
    decode_only = draw(st.booleans())
    # Mixed: decodes (1), fresh prompts (kv_len) and chunks extending a cached prefix.
    q_lens = [1 if decode_only else draw(st.sampled_from([1, kv, max(1, kv // 3)]))
              for kv in kv_lens]
    hkv = draw(st.sampled_from([1, 2, 3]))
    return dict(kv_lens=kv_lens, q_lens=q_lens, page_size=draw(st.sampled_from([1, 3, 4, 16])),
                hq=hkv * draw(st.sampled_from([1, 2, 3, 5])), hkv=hkv,
                d=draw(st.sampled_from([8, 16, 24, 64])), pad_seqs=draw(st.integers(0, 2)),
                pad_tokens=draw(st.sampled_from([1, 16])),
                seed=draw(st.integers(0, 2**31))), decode_only, draw(st.integers(-1, 2))


def layered(rng: np.random.Generator, cache: np.ndarray, layer: int) -> np.ndarray:
    """cache [pages, page, Hkv, D] as layer `layer` of a random [3, ...] all-layer cache."""
    full = rng.standard_normal((3, *cache.shape)).astype(cache.dtype) * 100
    full[layer] = cache
    return full


@settings(max_examples=25, deadline=None)
@given(batches())
def test_kernel_equals_oracle(spec):
    """layer -1: a one-layer cache; 0..2: that layer of a three-layer cache (the others hold
    large values, so reading a wrong layer shows)."""
    spec, decode_only, layer = spec
    rng = np.random.default_rng(spec.pop("seed"))
    case = make_case(rng, **spec)
    md = dataclasses.replace(case.md, decode_only=decode_only)
    k, v, lay = case.k_cache, case.v_cache, None
    if layer >= 0:
        k, v, lay = layered(rng, k, layer), layered(rng, v, layer), jnp.int32(layer)
    scale = spec["d"] ** -0.5
    want = np.asarray(_oracle(case.q, k, v, md, scale=scale, layer=lay))
    n = case.num_tokens
    np.testing.assert_allclose(want[:n], case.expected[:n], atol=1e-5, rtol=1e-4)
    for isa in LEVELS:
        got = np.asarray(_kernel(case.q, k, v, md, scale=scale, isa=isa, layer=lay))
        np.testing.assert_allclose(got[:n], want[:n], atol=2e-6, rtol=1e-5, err_msg=f"isa {isa}")
        np.testing.assert_array_equal(got[n:], 0)  # padding tokens: zeros


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_low_precision_caches_are_read_upcast(dtype):
    """bf16 and fp8 caches: the kernel equals the oracle on the same values upcast to
    float32 (it reads them exactly), and the oracle on the low-precision cache itself (which
    for bf16 rounds the probabilities to bf16 too) within that rounding."""
    rng = np.random.default_rng(5)
    case = make_case(rng, kv_lens=[37, 5, 64], q_lens=[1, 5, 20], page_size=16, hq=9, hkv=3,
                     d=64)
    k, v = (jnp.asarray(c).astype(dtype) for c in (case.k_cache, case.v_cache))
    if dtype == jnp.float8_e4m3fn:  # every finite code, subnormals included, at random
        codes = np.setdiff1d(np.arange(256, dtype=np.uint8), [0x7F, 0xFF])
        k, v = (jnp.asarray(rng.choice(codes, case.k_cache.shape).view(jnp.float8_e4m3fn))
                for _ in range(2))  # |values| up to 448: a small scale keeps scores moderate
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    n, scale = case.num_tokens, 64 ** -0.5 if dtype == jnp.bfloat16 else 1e-4
    exact = np.asarray(_oracle(case.q, k32, v32, case.md, scale=scale))[:n]
    low = np.asarray(_oracle(case.q, k, v, case.md, scale=scale))[:n]
    atol = 2e-6 * max(1.0, np.abs(exact).max())
    for isa in LEVELS:
        got = np.asarray(_kernel(case.q, k, v, case.md, scale=scale, isa=isa))[:n]
        np.testing.assert_allclose(got, exact, atol=atol, rtol=1e-5)
        np.testing.assert_allclose(got, low, atol=3e-2 if dtype == jnp.bfloat16 else atol)


def test_padding_and_unused_metadata_read_nothing():
    """Padding tokens with positions and sequence indices far out of range, and unused
    page-table entries pointing far past the cache: real tokens' outputs are unchanged and
    nothing reads outside the buffers (the kernel clamps as XLA's gather does)."""
    rng = np.random.default_rng(1)
    case = make_case(rng, kv_lens=[9, 30], q_lens=[1, 4], page_size=4, hq=4, hkv=2, d=16,
                     pad_seqs=2, extra_pages=1)
    n, md = case.num_tokens, case.md
    pt = np.array(md.page_table)
    used = -(-np.asarray(md.seq_lens) // 4)  # pages each sequence uses
    for s in range(pt.shape[0]):
        pt[s, used[s]:] = 10**6 if s % 2 else -10**6
    pos, seq = np.array(md.positions), np.array(md.token_seq)
    pos[n:], seq[n:] = 10**6, 10**6
    bad = dataclasses.replace(md, page_table=pt, positions=pos, token_seq=seq)
    want = np.asarray(_oracle(case.q, case.k_cache, case.v_cache, md, scale=0.25))
    for isa in LEVELS:
        got = np.asarray(_kernel(case.q, case.k_cache, case.v_cache, bad, scale=0.25, isa=isa))
        np.testing.assert_allclose(got[:n], want[:n], atol=2e-6, rtol=1e-5)
        np.testing.assert_array_equal(got[n:], 0)


def test_bad_shapes_are_refused():
    q = jnp.zeros((4, 6, 16))
    k = jnp.zeros((3, 4, 4, 16))  # Hkv 4 does not divide Hq 6
    case = make_case(np.random.default_rng(0), kv_lens=[3], q_lens=[1], page_size=4, hq=6,
                     hkv=2, d=16)
    with pytest.raises(ValueError, match=r"Hkv \(4\) must divide Hq \(6\)"):
        kernels.kernel(q, k, k, case.md, scale=1.0, isa=0)
    with pytest.raises(ValueError, match=r"\[L, num_pages, page, Hkv, D\]"):
        kernels.kernel(q, k, k, case.md, scale=1.0, isa=0, layer=jnp.int32(0))
    with pytest.raises(ValueError, match="float32, bfloat16 or float8_e4m3fn"):
        kernels.kernel(q, k.astype(jnp.float16), k.astype(jnp.float16), case.md, scale=1.0,
                       isa=0)


def test_backend_option_and_fallback(monkeypatch):
    """The backend takes the kernel by default, the oracle with `attention: reference`,
    ENGINE_CPU_ISA=none or a float16 cache; an unknown value is refused with the accepted
    ones."""
    case = make_case(np.random.default_rng(2), kv_lens=[20, 3], q_lens=[1, 3], page_size=4,
                     hq=4, hkv=2, d=16)
    args = (jnp.asarray(case.q), jnp.asarray(case.k_cache), jnp.asarray(case.v_cache), case.md)
    run = functools.partial(jax.jit, static_argnames=("scale",))
    want = np.asarray(_oracle(*args, scale=0.3))
    kern = np.asarray(_kernel(*args, scale=0.3, isa=NATIVE))
    assert not np.array_equal(want, kern)  # the two sum in different orders
    np.testing.assert_array_equal(np.asarray(run(CpuBackend().attention)(*args, scale=0.3)), kern)
    ref = CpuBackend({"attention": "reference"})
    np.testing.assert_array_equal(np.asarray(run(ref.attention)(*args, scale=0.3)), want)
    half = [a.astype(jnp.float16) for a in args[:3]]  # a cache dtype the kernel does not read
    got = run(CpuBackend().attention)(*half, case.md, scale=0.3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_oracle(*half, case.md, scale=0.3)))
    monkeypatch.setenv(envs.ENGINE_CPU_ISA, "none")
    assert kernels.isa_level() == -1 == linear.isa_level()
    np.testing.assert_array_equal(np.asarray(run(CpuBackend().attention)(*args, scale=0.3)), want)
    with pytest.raises(ValueError, match="kernel or reference"):
        CpuBackend({"attention": "flash"})
