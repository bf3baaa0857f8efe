"""The op map: each JAX primitive the model's step uses, as torch (elementwise, reductions,
shapes, matmuls, sort and top-k, the PRNG). Gather, scatter and dynamic slices are in
indexing.py; calls and loops in executor.py.

A rule is made once per equation when a plan is built: `rule(params, ins, outs)` gets the
equation's parameters and its input/output avals and returns the function the plan calls
on torch tensors. Operands of an elementwise primitive have one dtype (JAX inserts the
converts), so torch's type promotion never differs from JAX's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from backends.npu import prng
from backends.npu.dtypes import torch_dtype

Rule = Callable[[dict[str, Any], list[Any], list[Any]], Callable[..., Any]]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return register


def simple(name: str, fn: Callable[..., torch.Tensor]) -> None:
    RULES[name] = lambda params, ins, outs: fn


def _is_int(aval: Any) -> bool:
    return torch_dtype(aval.dtype) in (torch.int8, torch.int16, torch.int32, torch.int64,
                                       torch.uint8)


for _name, _fn in {
    "neg": torch.neg, "sign": torch.sign, "floor": torch.floor, "ceil": torch.ceil,
    "is_finite": torch.isfinite, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log,
    "log1p": torch.log1p, "expm1": torch.expm1, "tanh": torch.tanh, "logistic": torch.sigmoid,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "abs": torch.abs, "erf": torch.erf, "erf_inv": torch.erfinv,
    "square": torch.square, "not": torch.bitwise_not, "atan2": torch.atan2, "pow": torch.pow,
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "max": torch.maximum,
    "min": torch.minimum, "and": torch.bitwise_and, "or": torch.bitwise_or,
    "xor": torch.bitwise_xor, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le,
    "gt": torch.gt, "ge": torch.ge, "shift_left": torch.bitwise_left_shift,
    "shift_right_arithmetic": torch.bitwise_right_shift,
    "stop_gradient": lambda x: x, "copy": lambda x: x, "random_clone": lambda x: x,
    "optimization_barrier": lambda *xs: list(xs),
    "random_wrap": lambda x: x, "random_unwrap": lambda x: x,
    "random_fold_in": prng.fold_in,
}.items():
    simple(_name, _fn)


@rule("div")
def _div(params, ins, outs):
    if _is_int(ins[0]):  # XLA integer division rounds toward zero
        return lambda a, b: torch.div(a, b, rounding_mode="trunc")
    return torch.div


@rule("rem")
def _rem(params, ins, outs):
    return torch.fmod  # the sign of the dividend, as XLA (ints and floats)


@rule("shift_right_logical")
def _shr(params, ins, outs):
    if str(ins[0].dtype) == "uint32":  # held non-negative in int64 (dtypes.py)
        return lambda a, b: torch.where(b >= 32, 0, a >> b.clamp(max=63))
    bits = {torch.int32: 32, torch.int8: 8, torch.int16: 16, torch.int64: 64}[
        torch_dtype(ins[0].dtype)]
    mask = (1 << bits) - 1

    def shr(a, b):  # via int64 so the sign bit shifts in as zero
        out = (a.to(torch.int64) & mask) >> b.to(torch.int64).clamp(max=63)
        return torch.where(b >= bits, 0, out).to(a.dtype)
    return shr


@rule("integer_pow")
def _ipow(params, ins, outs):
    y = params["y"]
    return lambda x: torch.pow(x, y)


@rule("round")
def _round(params, ins, outs):
    if int(params.get("rounding_method", 0)) == 1:  # to nearest even
        return torch.round
    return lambda x: torch.sign(x) * torch.floor(torch.abs(x) + 0.5)  # away from zero


@rule("clamp")
def _clamp(params, ins, outs):
    return lambda lo, x, hi: torch.minimum(torch.maximum(x, lo), hi)


@rule("select_n")
def _select_n(params, ins, outs):
    def select(pred, *cases):
        if len(cases) == 2 or pred.dtype == torch.bool:
            return torch.where(pred.to(torch.bool), cases[1], cases[0])
        out = cases[0]
        for i, c in enumerate(cases[1:], 1):
            out = torch.where(pred == i, c, out)
        return out
    return select


@rule("convert_element_type")
def _convert(params, ins, outs):
    dt = torch_dtype(params["new_dtype"])
    if str(params["new_dtype"]) == "uint32":
        return lambda x: x.to(torch.int64) & prng.MASK  # two's complement wrap, as XLA
    if dt == torch.bool:
        return lambda x: x != 0
    return lambda x: x.to(dt)


@rule("bitcast_convert_type")
def _bitcast(params, ins, outs):
    src, dst = str(ins[0].dtype), str(params["new_dtype"])
    dt = torch_dtype(dst)
    if src == "uint32":  # int64-held: narrow to 32 bits (wraps), then reinterpret
        return lambda x: x.to(torch.int32).view(dt)
    if dst == "uint32":
        return lambda x: x.view(torch.int32).to(torch.int64) & prng.MASK
    return lambda x: x.view(dt)


# ---- reductions ----

def _reduction(fn: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]) -> Rule:
    def make(params, ins, outs):
        axes = tuple(params["axes"])
        return lambda x: x if not axes else fn(x, axes)
    return make


RULES["reduce_sum"] = _reduction(lambda x, a: torch.sum(x, dim=a, dtype=x.dtype))
RULES["reduce_max"] = _reduction(lambda x, a: torch.amax(x, dim=a))
RULES["reduce_min"] = _reduction(lambda x, a: torch.amin(x, dim=a))
RULES["reduce_prod"] = _reduction(
    lambda x, a: x.permute(*[d for d in range(x.ndim) if d not in a], *a)
    .flatten(x.ndim - len(a)).prod(-1))
RULES["reduce_and"] = _reduction(lambda x, a: torch.all(x, dim=a) if x.dtype == torch.bool
                                 else _bitwise_reduce(x, a, torch.bitwise_and))
RULES["reduce_or"] = _reduction(lambda x, a: torch.any(x, dim=a) if x.dtype == torch.bool
                                else _bitwise_reduce(x, a, torch.bitwise_or))


def _bitwise_reduce(x, axes, op):
    for a in sorted(axes, reverse=True):
        parts = x.unbind(a)
        acc = parts[0]
        for p in parts[1:]:
            acc = op(acc, p)
        x = acc
    return x


def _arg(fn):
    def make(params, ins, outs):
        (axis,) = params["axes"]
        dt = torch_dtype(params["index_dtype"])
        return lambda x: fn(x, dim=axis).to(dt)  # first index of the extreme, as XLA
    return make


RULES["argmax"], RULES["argmin"] = _arg(torch.argmax), _arg(torch.argmin)


def _cumulative(fn):
    def make(params, ins, outs):
        axis, reverse = params["axis"], params["reverse"]

        def run(x):
            if reverse:
                return fn(x.flip(axis), axis).flip(axis)
            return fn(x, axis)
        return run
    return make


RULES["cumsum"] = _cumulative(lambda x, a: torch.cumsum(x, a, dtype=x.dtype))
RULES["cumprod"] = _cumulative(lambda x, a: torch.cumprod(x, a, dtype=x.dtype))
RULES["cummax"] = _cumulative(lambda x, a: torch.cummax(x, a).values)
RULES["cummin"] = _cumulative(lambda x, a: torch.cummin(x, a).values)
RULES["cumlogsumexp"] = _cumulative(torch.logcumsumexp)


# ---- shapes ----

@rule("reshape")
def _reshape(params, ins, outs):
    if params.get("dimensions"):
        raise NotImplementedError("reshape with `dimensions` (a transposing reshape)")
    shape = tuple(params["new_sizes"])
    return lambda x: x.reshape(shape)


@rule("broadcast_in_dim")
def _bcast(params, ins, outs):
    shape, dims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
    view = [1] * len(shape)

    def run(x, *dyn):
        v = list(view)
        for src, d in enumerate(dims):
            v[d] = x.shape[src]
        return x.reshape(v).expand(shape)
    return run


@rule("transpose")
def _transpose(params, ins, outs):
    perm = tuple(params["permutation"])
    return lambda x: x.permute(perm)


@rule("squeeze")
def _squeeze(params, ins, outs):
    shape = tuple(outs[0].shape)
    return lambda x: x.reshape(shape)


@rule("concatenate")
def _concat(params, ins, outs):
    d = params["dimension"]
    return lambda *xs: torch.cat(xs, dim=d)


@rule("split")
def _split(params, ins, outs):
    sizes, axis = [int(s) for s in params["sizes"]], params["axis"]
    return lambda x: list(torch.split(x, sizes, dim=axis))


@rule("slice")
def _slice(params, ins, outs):
    starts, limits = params["start_indices"], params["limit_indices"]
    strides = params["strides"] or (1,) * len(starts)
    idx = tuple(slice(s, e, st) for s, e, st in zip(starts, limits, strides, strict=True))
    return lambda x: x[idx]


@rule("rev")
def _rev(params, ins, outs):
    dims = tuple(params["dimensions"])
    return lambda x: x.flip(dims)


@rule("pad")
def _pad(params, ins, outs):
    cfg = params["padding_config"]
    if any(lo < 0 or hi < 0 for lo, hi, _ in cfg):
        raise NotImplementedError(f"pad with negative (cropping) padding {cfg}")
    out_shape = tuple(outs[0].shape)
    # input element i of a dim lands at lo + i * (interior + 1)
    dst = tuple(slice(lo, lo + (n - 1) * (it + 1) + 1, it + 1) if n else slice(0, 0)
                for (lo, _, it), n in zip(cfg, ins[0].shape, strict=True))

    def run(x, value):
        out = value.expand(out_shape).clone()
        out[dst] = x
        return out
    return run


@rule("iota")
def _iota(params, ins, outs):
    shape, dim = tuple(params["shape"]), params["dimension"]
    dt = torch_dtype(params["dtype"])
    view = [1] * len(shape)
    view[dim] = shape[dim]

    def run(*, device):
        return torch.arange(shape[dim], dtype=dt, device=device).reshape(view).expand(shape)
    run.needs_device = True  # type: ignore[attr-defined]
    return run


# ---- matmuls ----

def _dot(lhs: torch.Tensor, rhs: torch.Tensor, dnums: Any, out_dt: torch.dtype) -> torch.Tensor:
    """XLA dot_general: output dims are batch, lhs free, rhs free (each in operand order)."""
    (lc, rc), (lb, rb) = dnums
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    if lhs.dtype != out_dt and out_dt.is_floating_point:  # accumulate in the output type
        lhs, rhs = lhs.to(out_dt), rhs.to(out_dt)
    bshape = [lhs.shape[d] for d in lb]
    lfs, rfs = [lhs.shape[d] for d in lf], [rhs.shape[d] for d in rf]
    k = math.prod(lhs.shape[d] for d in lc)
    a = lhs.permute(*lb, *lf, *lc).reshape(math.prod(bshape), math.prod(lfs), k)
    b = rhs.permute(*rb, *rc, *rf).reshape(math.prod(bshape), k, math.prod(rfs))
    if not a.dtype.is_floating_point and a.device.type != "cpu":
        out = torch.bmm(a.double(), b.double()).to(a.dtype)
    else:
        out = torch.bmm(a, b)
    return out.reshape((*bshape, *lfs, *rfs)).to(out_dt)


@rule("dot_general")
def _dot_general(params, ins, outs):
    dnums = params["dimension_numbers"]
    out_dt = torch_dtype(outs[0].dtype)
    return lambda a, b: _dot(a, b, dnums, out_dt)


@rule("ragged_dot_general")
def _ragged_dot(params, ins, outs):
    """lhs [M, K] in groups of consecutive rows, rhs [G, K, N], sizes [G] -> [M, N]: each row
    times its group's matrix (rows past the last group: zeros). One dense product per group,
    selected by row: G times the FLOPs, no host read of the sizes (graph-capturable)."""
    rd = params["ragged_dot_dimension_numbers"]
    if (tuple(rd.lhs_ragged_dimensions) != (0,) or tuple(rd.rhs_group_dimensions) != (0,)
            or tuple(map(tuple, rd.dot_dimension_numbers[0])) != ((1,), (1,))
            or params.get("group_offset") is not None):
        raise NotImplementedError(f"ragged_dot_general with {rd} (only lhs [M, K] ragged over "
                                  f"M, rhs [G, K, N])")
    out_dt = torch_dtype(outs[0].dtype)

    def run(lhs, rhs, sizes):
        ends = torch.cumsum(sizes.to(torch.int64), 0)  # [G]
        row = torch.arange(lhs.shape[0], device=lhs.device)
        group = torch.searchsorted(ends, row, right=True)  # [M]; G past the last group
        acc_dt = torch.float32 if lhs.dtype in (torch.bfloat16, torch.float16) else lhs.dtype
        out = torch.zeros(lhs.shape[0], rhs.shape[2], dtype=acc_dt, device=lhs.device)
        for g in range(rhs.shape[0]):
            y = (lhs.to(acc_dt) @ rhs[g].to(acc_dt))
            out = torch.where((group == g)[:, None], y, out)
        return out.to(out_dt)
    return run


# ---- sorting ----

@rule("sort")
def _sort(params, ins, outs):
    dim, num_keys = params["dimension"], params["num_keys"]

    def run(*xs):
        order = None
        for key in reversed(xs[:num_keys]):  # lexicographic: stable sorts, last key first
            k = key if order is None else torch.take_along_dim(key, order, dim)
            o = torch.sort(k, dim=dim, stable=True).indices
            order = o if order is None else torch.take_along_dim(order, o, dim)
        return [torch.take_along_dim(x, order, dim) for x in xs]
    return run


@rule("top_k")
def _top_k(params, ins, outs):
    """Ties keep the lower index first, as XLA: a stable descending sort, not torch.topk."""
    k, axis = params["k"], params.get("axis", -1)
    idx_dt = torch_dtype(outs[1].dtype)

    def run(x):
        s = torch.sort(x, dim=axis, descending=True, stable=True)
        return [s.values.narrow(axis, 0, k), s.indices.narrow(axis, 0, k).to(idx_dt)]
    return run


# ---- PRNG (threefry, the sampler's Gumbel noise) ----

@rule("random_bits")
def _random_bits(params, ins, outs):
    if params["bit_width"] != 32:
        raise NotImplementedError(f"random_bits of {params['bit_width']} bits (only 32)")
    shape = tuple(params["shape"])
    return lambda keys: prng.random_bits(keys, shape)


@rule("random_seed")
def _random_seed(params, ins, outs):
    def seed(x):  # a 32-bit seed: (high word, low word) = (0, seed)
        x = x.to(torch.int64) & prng.MASK
        return torch.stack([torch.zeros_like(x), x], dim=-1)
    return seed


@rule("random_split")
def _random_split(params, ins, outs):
    shape = tuple(params["shape"])
    return lambda keys: prng.split(keys, shape)
