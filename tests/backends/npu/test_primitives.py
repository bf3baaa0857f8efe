"""Each primitive the executor maps equals JAX (jax.jit on the CPU) on random shapes and
dtypes; every mapped primitive is exercised here (test_every_mapped_primitive_is_tested)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr

from backends.npu.executor import _CONTROL, RULES, UnmappedPrimitive
from tests.backends.npu.helpers import assert_same, run_torch

F32, BF16 = jnp.float32, jnp.bfloat16
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,
                    phases=(Phase.explicit, Phase.generate))  # no shrinking: slow here
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
float_dtypes = st.sampled_from([F32, BF16])


def rand(seed: int, shape: tuple, dtype, lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if jnp.issubdtype(dtype, jnp.floating):
        return rng.uniform(lo, hi, shape).astype(dtype)
    if dtype == jnp.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(int(lo), int(hi) + 1, shape).astype(dtype)


def tol(dtype) -> dict:
    return dict(rtol=1e-2, atol=1e-2) if dtype == BF16 else {}


UNARY = {"neg": jnp.negative, "sign": jnp.sign, "floor": jnp.floor, "ceil": jnp.ceil,
         "round": lambda x: lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN),
         "round_away": lax.round, "is_finite": jnp.isfinite, "exp": jnp.exp, "exp2": jnp.exp2,
         "log": lambda x: jnp.log(jnp.abs(x) + 0.1), "log1p": lambda x: jnp.log1p(jnp.abs(x)),
         "expm1": jnp.expm1, "tanh": jnp.tanh, "logistic": jax.nn.sigmoid, "sin": jnp.sin,
         "cos": jnp.cos, "tan": lambda x: jnp.tan(x / 3), "sqrt": lambda x: jnp.sqrt(jnp.abs(x)),
         "rsqrt": lambda x: lax.rsqrt(jnp.abs(x) + 0.1), "abs": jnp.abs, "erf": lax.erf,
         "erf_inv": lambda x: lax.erf_inv(x / 4), "square": jnp.square,
         "integer_pow": lambda x: lax.integer_pow(x, 3), "stop_gradient": lax.stop_gradient,
         "copy": jnp.copy, "convert": lambda x: x.astype(jnp.int32),
         "convert_bool": lambda x: x.astype(bool), "reduce_precision": lambda x: x * 2}
BINARY = {"add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "div": jnp.divide,
          "rem": jnp.fmod, "max": jnp.maximum, "min": jnp.minimum, "atan2": jnp.arctan2,
          "pow": lambda a, b: jnp.power(jnp.abs(a) + 0.5, b), "eq": jnp.equal,
          "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal, "gt": jnp.greater,
          "ge": jnp.greater_equal, "select_n": lambda a, b: jnp.where(a > b, a, b),
          "clamp": lambda a, b: lax.clamp(jnp.array(-1, a.dtype), a, jnp.array(1, a.dtype)) + b}


# One function per table and example (one trace, one compile): outputs keyed by op name.

@SETTINGS
@given(shape=shapes, dtype=float_dtypes, seed=st.integers(0, 2**16))
def test_unary(shape, dtype, seed):
    x = rand(seed, shape, dtype)
    x[..., 0] = 0.5  # a tie for round
    assert_same(lambda x: {k: f(x) for k, f in UNARY.items()}, x, **tol(dtype))


@SETTINGS
@given(shape=shapes, dtype=float_dtypes, seed=st.integers(0, 2**16))
def test_binary(shape, dtype, seed):
    a, b = rand(seed, shape, dtype), rand(seed + 1, shape, dtype)
    assert_same(lambda a, b: {k: f(a, b) for k, f in BINARY.items()}, a, b, **tol(dtype))


INT_BINARY = {"div": lambda a, b: lax.div(a, jnp.where(b == 0, 1, b)),
              "rem": lambda a, b: lax.rem(a, jnp.where(b == 0, 1, b)),
              "and": jnp.bitwise_and, "or": jnp.bitwise_or, "xor": jnp.bitwise_xor,
              "not": lambda a, b: jnp.bitwise_not(a) + b,
              "shift_left": lambda a, b: lax.shift_left(a, jnp.abs(b) % 33),
              "shift_right_logical": lambda a, b: lax.shift_right_logical(a, jnp.abs(b) % 33),
              "shift_right_arithmetic": lambda a, b: lax.shift_right_arithmetic(a, jnp.abs(b) % 32),
              "u32": lambda a, b: (lax.shift_right_logical(a.astype(jnp.uint32), jnp.uint32(3))
                                   * b.astype(jnp.uint32) + jnp.uint32(7)),
              "bool": lambda a, b: jnp.logical_not(a > 0) & (b > 0) | (a == b) ^ (a < b)}


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_integer_binary(shape, seed):
    a = rand(seed, shape, jnp.int32, -(2**31), 2**31 - 1)
    b = rand(seed + 1, shape, jnp.int32, -40, 40)
    assert_same(lambda a, b: {k: f(a, b) for k, f in INT_BINARY.items()}, a, b)


REDUCE = {"reduce_sum": lambda x, ax: jnp.sum(x, ax),
          "reduce_max": lambda x, ax: jnp.max(x, ax),
          "reduce_min": lambda x, ax: jnp.min(x, ax),
          "reduce_prod": lambda x, ax: jnp.prod(x, ax),
          "reduce_and": lambda x, ax: jnp.all(x > 0, ax),
          "reduce_or": lambda x, ax: jnp.any(x > 0, ax),
          "argmax": lambda x, ax: jnp.argmax(x, ax[0]),
          "argmin": lambda x, ax: jnp.argmin(x, ax[0]),
          "cumsum": lambda x, ax: jnp.cumsum(x, ax[0]),
          "cumprod": lambda x, ax: lax.cumprod(x, ax[0]),
          "cummax": lambda x, ax: lax.cummax(x, ax[0], reverse=True),
          "cummin": lambda x, ax: lax.cummin(x, ax[0]),
          "cumlogsumexp": lambda x, ax: lax.cumlogsumexp(x, ax[0]),
          "int_reduce": lambda x, ax: (jnp.sum(x.astype(jnp.int32), ax),
                                       jnp.bitwise_and.reduce(x.astype(jnp.int32), axis=ax))}


@SETTINGS
@given(shape=shapes, dtype=float_dtypes, seed=st.integers(0, 2**16), data=st.data())
def test_reductions(shape, dtype, seed, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = rand(seed, shape, dtype, -1.5, 1.5)
    assert_same(lambda x: {k: f(x, axes) for k, f in REDUCE.items()}, x, **tol(dtype))


@SETTINGS
@given(shape=shapes, dtype=float_dtypes, seed=st.integers(0, 2**16), data=st.data())
def test_shapes(shape, dtype, seed, data):
    """reshape, broadcast_in_dim, transpose, squeeze, concatenate, split, slice, rev, pad,
    iota, expand_dims."""
    x = rand(seed, shape, dtype)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    ax = data.draw(st.integers(0, len(shape) - 1))

    def fn(x):
        y = jnp.transpose(x, perm).reshape(-1)[::-1]
        z = jnp.concatenate([x, x * 2], axis=ax)
        a, b = jnp.split(z, 2, axis=ax)
        s = lax.slice(z, (0,) * z.ndim, z.shape, (1,) * (z.ndim - 1) + (2,))
        p = lax.pad(x, jnp.array(0.5, x.dtype), [(1, 2, 1)] * x.ndim)
        e = jnp.expand_dims(x, 0).squeeze(0) + lax.broadcasted_iota(x.dtype, x.shape, ax)
        return y, a - b, s, p, e, jnp.broadcast_to(x[..., :1], (2, *x.shape))
    assert_same(fn, x, **tol(dtype))


@SETTINGS
@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6), b=st.integers(1, 3),
       dtype=float_dtypes, seed=st.integers(0, 2**16))
def test_dot_general(m, k, n, b, dtype, seed):
    x, w = rand(seed, (b, m, k), dtype), rand(seed + 1, (k, b, n), dtype)

    def fn(x, w):
        return (jnp.einsum("bmk,kbn->bnm", x, w),
                jnp.einsum("bmk,kbn->mn", x, w, preferred_element_type=jnp.float32),
                jnp.einsum("bmk,bmk->", x.astype(jnp.int32), x.astype(jnp.int32)))
    assert_same(fn, x, w, **(dict(rtol=2e-2, atol=5e-2) if dtype == BF16
                             else dict(rtol=1e-5, atol=1e-5)))


@SETTINGS
@given(groups=st.lists(st.integers(0, 4), min_size=1, max_size=4), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_ragged_dot(groups, pad, seed):
    m = sum(groups) + pad  # rows past the last group: left out of the comparison
    x, w = rand(seed, (max(m, 1), 5), F32), rand(seed + 1, (len(groups), 5, 3), F32)
    sizes = np.array(groups, np.int32)
    fn = lambda x, w, s: jnp.where(jnp.arange(x.shape[0])[:, None] < s.sum(),
                                   lax.ragged_dot(x, w, s), 0.0)
    assert_same(fn, x, w, sizes, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), k=st.integers(1, 3))
def test_sort_argsort_top_k(shape, seed, k):
    x = rand(seed, shape, F32, -2, 2).round(0)  # ties: order among equals must match
    k = min(k, shape[-1])
    fn = lambda x: (jnp.sort(x, axis=0), jnp.argsort(x, axis=-1, stable=True),
                    lax.top_k(x, k), lax.sort((x, -x, x * 0 + 1), num_keys=2))
    assert_same(fn, x)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_gather_scatter(shape, seed, data):
    """NumPy-style indexing (gather), .at[] set/add/mul/min/max (scatter) in clip, drop and
    fill modes, with out-of-range indices, and batched (vmapped) indexing."""
    x = rand(seed, shape, F32)
    n = shape[0]
    idx = np.array(data.draw(st.lists(st.integers(-n - 2, n + 2), min_size=1, max_size=6)),
                   np.int32)
    upd = rand(seed + 1, (len(idx), *shape[1:]), F32)

    def fn(x, idx, upd):
        ok = jnp.clip(idx, 0, n - 1)
        col = jnp.broadcast_to(ok[0] % (x.size // n), (n,))  # one column per row (batched)
        return (x[ok], x.at[idx].get(mode="fill", fill_value=-7.0), x.at[idx].get(mode="clip"),
                x.at[idx].set(upd, mode="drop"), x.at[ok].add(upd), x.at[idx].mul(upd, mode="drop"),
                x.at[ok].min(upd), x.at[ok].max(upd, mode="clip"),
                jax.vmap(lambda r, i: r[i])(x.reshape(n, -1), col),
                jax.vmap(lambda r, i, u: r.at[i].add(u))(x.reshape(n, -1), col,
                                                         jnp.ones(n, x.dtype)))
    assert_same(fn, x, idx, upd)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_dynamic_slices(shape, seed, data):
    x = rand(seed, shape, F32)
    starts = [data.draw(st.integers(-2, s + 2)) for s in shape]
    sizes = [data.draw(st.integers(1, s)) for s in shape]
    upd = rand(seed + 1, tuple(sizes), F32)

    def fn(x, upd, *starts):
        return lax.dynamic_slice(x, starts, sizes), lax.dynamic_update_slice(x, upd, starts)
    assert_same(fn, x, upd, *np.array(starts, np.int32))


def test_control_flow_scan_while_cond():
    def fn(x):
        c, ys = lax.scan(lambda c, r: (c * 0.5 + r, c.sum()), x[0], x, reverse=True)
        w = lax.while_loop(lambda v: v[0] < 10, lambda v: (v[0] + 3, v[1] * 1.5), (0, x[1]))
        b = lax.cond(x.sum() > 0, lambda v: v * 2, lambda v: v - 1, x)
        sw = lax.switch(2, [jnp.sin, jnp.cos, jnp.tanh], x)
        return c, ys, w, b, sw
    assert_same(fn, rand(3, (4, 3), F32))


def test_calls_custom_jvp_and_remat():
    fn = lambda x: (jax.nn.gelu(x), jax.nn.relu(x), jax.checkpoint(jnp.sin)(x),
                    jax.jit(lambda y: y * 2)(x), lax.optimization_barrier((x, x * 3)))
    assert_same(fn, rand(4, (3, 5), F32))


@SETTINGS
@given(n=st.integers(1, 5), v=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_prng_threefry_bits_equal_jax(n, v, seed):
    """The sampler's PRNG: wrap_key_data, fold_in, random bits and the Gumbel noise made from
    them are bit-for-bit JAX's (threefry2x32), batched over keys as the sampler vmaps."""
    keys = np.random.default_rng(seed).integers(0, 2**32, (n, 2), dtype=np.uint64)
    keys = keys.astype(np.uint32)
    steps = np.arange(n, dtype=np.int32) * 977 - 3

    def fold(kd, step):
        return jax.random.fold_in(jax.random.wrap_key_data(kd, impl="threefry2x32"), step)

    def bits(k, s):  # integers: compared exactly
        row = lambda kd, step: (jax.random.bits(fold(kd, step), (v,)),
                                jax.random.key_data(jax.random.key(step)))
        return jax.vmap(row)(k, s), jax.random.key_data(jax.random.split(
            jax.random.wrap_key_data(k[0], impl="threefry2x32"), 3))

    def gumbel(k, s):  # -log(-log(u)) of those bits: log may differ in the last bit
        return jax.vmap(lambda kd, step: jax.random.gumbel(fold(kd, step), (v,)))(k, s)
    assert_same(bits, keys, steps)
    assert_same(gumbel, keys, steps, rtol=1e-6, atol=1e-7)


def _primitives(jaxpr, out: collections.Counter) -> None:
    for e in jaxpr.eqns:
        out[e.primitive.name] += 1
        for p in e.params.values():
            for q in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(q, ClosedJaxpr):
                    _primitives(q.jaxpr, out)
                elif isinstance(q, Jaxpr):
                    _primitives(q, out)


def test_every_mapped_primitive_is_tested():
    """Each primitive with a rule (and scan/while/cond) appears in a case above: the JAX
    functions of this module, traced, use them all."""
    seen: collections.Counter = collections.Counter()
    x, i = rand(0, (4, 3), F32), rand(0, (4, 3), jnp.int32)
    fns = [*(lambda x, f=f: f(x) for f in UNARY.values()),
           *(lambda x, f=f: f(x, x) for f in BINARY.values()),
           *(lambda x, f=f: f(x, (0,)) for f in REDUCE.values())]
    for f in fns:
        _primitives(jax.make_jaxpr(f)(x).jaxpr, seen)
    for f in INT_BINARY.values():
        _primitives(jax.make_jaxpr(f)(i, i).jaxpr, seen)
    extra = [lambda x: lax.top_k(x, 2), lambda x: lax.sort((x, x), num_keys=2),
             lambda x: jnp.transpose(x).reshape(-1)[::-1],
             lambda x: jnp.split(jnp.concatenate([x, x]), 2),
             lambda x: lax.pad(x, 0.0, [(1, 1, 1)] * 2), lambda x: lax.iota(jnp.int32, 3),
             lambda x: lax.ragged_dot(x, x[None].repeat(2, 0).transpose(0, 2, 1),
                                      jnp.array([2, 2])),
             lambda x: (x.at[0].set(1.0), x.at[0].add(1.0), x.at[0].mul(2.0), x.at[0].min(0.0),
                        x.at[0].max(0.0), x[jnp.array([1, 0])]),
             lambda x: (lax.dynamic_slice(x, (1, 0), (2, 2)),
                        lax.dynamic_update_slice(x, x[:1], (1, 0))),
             lambda x: (lax.scan(lambda c, r: (c, r), 0.0, x), lax.cond(True, jnp.sin, jnp.cos, x),
                        lax.while_loop(lambda v: v < 1, lambda v: v + 1, 0)),
             lambda x: jax.random.gumbel(jax.random.fold_in(jax.random.key(0), 1), (3,)),
             lambda x: jax.random.key_data(jax.random.split(jax.random.key(0))),
             lambda x: jax.random.key_data(jax.random.clone(jax.random.wrap_key_data(
                 jnp.zeros(2, jnp.uint32)))),
             lambda x: jnp.float32(1).view(jnp.int32), lambda x: jnp.einsum("ij,kj->ik", x, x),
             lambda x: lax.optimization_barrier(x)]
    for f in extra:
        _primitives(jax.make_jaxpr(f)(x).jaxpr, seen)
    missing = (set(RULES) | set(_CONTROL)) - set(seen)
    assert not missing, f"mapped but untested: {sorted(missing)}"


def test_unmapped_primitive_is_a_clear_error():
    with pytest.raises(UnmappedPrimitive, match="'population_count'"):
        run_torch(lambda x: lax.population_count(x), np.arange(4, dtype=np.int32))
