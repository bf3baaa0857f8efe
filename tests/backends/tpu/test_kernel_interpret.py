"""The Pallas TPU kernel, run in Pallas's TPU interpret mode on the CPU, equals the CPU oracle
on random mixed ragged batches.

The interpreter simulates the TPU's memories: DMAs and semaphores, scratch buffers filled with
NaN, out-of-bounds reads raising, and 'parallel' grid steps in a random order. Each shape
class is compiled once (batches are padded to the class's shapes), then several random
batches run through it, so the file stays fast on two cores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.tpu.kernels.ragged_paged_attention import (
    BlockSizes,
    dynamic_validate_inputs,
    from_oracle_layout,
    ragged_paged_attention,
)
from tests.backends.ragged_batches import RaggedCase, make_case


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    page: int
    hkv: int
    g: int  # query heads per KV head (the GQA ratio)
    d: int
    dtype: str
    blocks: BlockSizes
    layers: int = 0  # > 0: caches stacked [L, ...] and read at a traced layer index
    tokens: int = 48  # T, padded
    seqs: int = 6  # S, padded
    max_kv: int = 70


CLASSES = {
    "page8-mqa4-d64": ShapeClass(8, 1, 4, 64, "float32", BlockSizes(2, 16, 1)),
    "page16-gqa2-d128": ShapeClass(16, 2, 2, 128, "float32", BlockSizes(2, 16, 1)),
    "page32-mha-d64-stacked": ShapeClass(32, 2, 1, 64, "float32", BlockSizes(1, 32, 2),
                                         layers=3),
    "page16-gqa3-d128-bf16": ShapeClass(16, 2, 3, 128, "bfloat16", BlockSizes(4, 16, 2),
                                        layers=2),
}
BATCHES_PER_CLASS = 5


def random_lens(rng: np.random.Generator, sc: ShapeClass) -> tuple[list[int], list[int]]:
    """A mixed batch: decodes, fresh prompts, and chunks that start mid-page after a cached
    prefix; some long enough to span query blocks and several K/V blocks."""
    kv_lens, q_lens, budget = [], [], sc.tokens
    for _ in range(rng.integers(1, sc.seqs + 1)):
        kv = int(rng.integers(1, sc.max_kv + 1))
        kind = rng.choice(["decode", "prompt", "chunk"])
        q = {"decode": 1, "prompt": kv, "chunk": int(rng.integers(1, kv + 1))}[kind]
        q = min(q, budget)
        if q == 0:
            break
        kv_lens.append(kv)
        q_lens.append(q)
        budget -= q
    return kv_lens, q_lens


def pad_case(case: RaggedCase, sc: ShapeClass, num_pages: int) -> RaggedCase:
    """Pad to the class's shapes (T tokens, S sequences, P pages per sequence, num_pages)."""
    md = case.md
    t0, s0 = case.q.shape[0], md.seq_lens.shape[0]
    p = -(-sc.max_kv // sc.page)
    extra = num_pages - case.k_cache.shape[0]
    rng = np.random.default_rng(0)
    fill = lambda c: np.concatenate(
        [c, rng.standard_normal((extra, *c.shape[1:])).astype(c.dtype)])
    table = np.zeros((sc.seqs, p), np.int32)
    table[:s0, :md.page_table.shape[1]] = md.page_table
    qs = np.full(sc.seqs + 1, case.num_tokens, np.int32)
    qs[:s0 + 1] = md.query_start
    grow = lambda x: np.concatenate([x, np.zeros(sc.tokens - t0, x.dtype)])
    md = dataclasses.replace(
        md, positions=grow(md.positions), token_seq=grow(md.token_seq),
        slot_mapping=np.full(sc.tokens, num_pages * sc.page, np.int32), query_start=qs,
        seq_lens=np.concatenate([md.seq_lens, np.zeros(sc.seqs - s0, np.int32)]),
        page_table=table)
    q = np.concatenate([case.q, np.zeros((sc.tokens - t0, *case.q.shape[1:]), case.q.dtype)])
    expected = np.concatenate([case.expected, np.zeros_like(q[t0:])])
    return RaggedCase(q, fill(case.k_cache), fill(case.v_cache), md, expected, case.num_tokens)


def make_batch(sc: ShapeClass, seed: int) -> RaggedCase:
    rng = np.random.default_rng(seed)
    kv_lens, q_lens = random_lens(rng, sc)
    case = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, page_size=sc.page, hq=sc.hkv * sc.g,
                     hkv=sc.hkv, d=sc.d, pad_tokens=1, extra_pages=0,
                     dtype=jnp.dtype(sc.dtype))
    num_pages = sc.seqs * -(-sc.max_kv // sc.page) + 2
    case = pad_case(case, sc, num_pages)
    dynamic_validate_inputs(case.md, num_pages)
    return case


def stack(cache: np.ndarray, layers: int, at: int, seed: int) -> np.ndarray:
    """[L, ...] with `cache` at layer `at` and noise elsewhere (a wrong layer shows)."""
    noise = np.random.default_rng(seed).standard_normal((layers, *cache.shape))
    out = noise.astype(cache.dtype)
    out[at] = cache
    return out


def run_kernel(case: RaggedCase, sc: ShapeClass, interpret, layer: int | None):
    k, v = from_oracle_layout(case.k_cache), from_oracle_layout(case.v_cache)
    if layer is not None:
        k, v = stack(np.asarray(k), sc.layers, layer, 1), stack(np.asarray(v), sc.layers, layer, 2)
    lyr = None if layer is None else jnp.int32(layer)
    out = ragged_paged_attention(jnp.asarray(case.q), jnp.asarray(k), jnp.asarray(v), case.md,
                                 lyr, scale=sc.d**-0.5, block_sizes=sc.blocks,
                                 interpret=interpret)
    return np.asarray(out.astype(jnp.float32))


_oracle = jax.jit(lambda q, k, v, md, scale: oracle(q, k, v, md, scale=scale),
                  static_argnames="scale")


@pytest.mark.parametrize("name", list(CLASSES))
def test_kernel_equals_oracle_on_random_ragged_batches(name):
    sc = CLASSES[name]
    tol = dict(atol=2e-5, rtol=2e-5) if sc.dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    # Parallel grid steps run in a random order (one seed per class: one compilation).
    interpret = pltpu.InterpretParams(random_seed=len(name))
    for i in range(BATCHES_PER_CLASS):
        case = make_batch(sc, seed=1000 * i + len(name))
        layer = (i % sc.layers) if sc.layers else None
        out = run_kernel(case, sc, interpret, layer)
        want = np.asarray(_oracle(case.q, case.k_cache, case.v_cache, case.md,
                                  sc.d**-0.5).astype(jnp.float32))
        n = case.num_tokens
        np.testing.assert_allclose(out[:n], want[:n], **tol, err_msg=f"batch {i}")
        # Padding tokens belong to no sequence: they come out as exact zeros, not NaN.
        np.testing.assert_array_equal(out[n:], 0.0)


def test_slots_past_the_sequence_end_are_never_read():
    """NaN in the unused tail of every sequence's last page (stale data of a reused page)
    must not reach the output: the kernel masks scores and zeroes V past the horizon."""
    sc = CLASSES["page16-gqa2-d128"]
    case = make_batch(sc, seed=7)
    k, v = case.k_cache.copy(), case.v_cache.copy()
    for s, kv_len in enumerate(case.md.seq_lens):
        if kv_len and kv_len % sc.page:
            last = case.md.page_table[s, (kv_len - 1) // sc.page]
            k[last, kv_len % sc.page:] = np.nan
            v[last, kv_len % sc.page:] = np.nan
    poisoned = dataclasses.replace(case, k_cache=k, v_cache=v)
    out = run_kernel(poisoned, sc, pltpu.InterpretParams(), None)
    n = case.num_tokens
    np.testing.assert_allclose(out[:n], case.expected[:n], atol=2e-5, rtol=2e-5)


def test_hlo_interpreter_agrees():
    """interpret='hlo' (the kernel lowered to plain XLA, used for fast CPU runs) gives the
    same result as the TPU simulator."""
    sc = CLASSES["page8-mqa4-d64"]
    case = make_batch(sc, seed=3)
    a = run_kernel(case, sc, True, None)
    b = run_kernel(case, sc, pltpu.InterpretParams(), None)
    np.testing.assert_allclose(a, b, atol=1e-6)
