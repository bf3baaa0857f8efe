"""The torch executor: a JAX function's jaxpr, run primitive by primitive with torch ops.

`TorchJit(fn)` is called like `jax.jit(fn)`. Per distinct input structure and shapes (one
per bucket) it traces `fn` once (`jax.make_jaxpr`) and converts the jaxpr into a Program:
a flat list of instructions, each a torch function made by the op map (primitives.py,
indexing.py) with the equation's parameters bound, reading and writing numbered
registers. Calls (jit, custom_jvp/vjp, remat) are inlined as sub-programs; scan, while
and cond become Python loops and branches; the named calls npu_attention / npu_write_kv
go to the fused ops or their references (kernels.py). A primitive without a mapping is an
error naming it, raised when the plan is built, before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import torch
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from backends.npu import indexing  # noqa: F401  (registers gather/scatter/dynamic slices)
from backends.npu.dtypes import is_wide_uint32, to_numpy, to_torch, torch_dtype
from backends.npu.kernels import make_attention, make_write_kv
from backends.npu.primitives import RULES
from backends.npu.prng import MASK

_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
          "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin", "named_call")
_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class UnmappedPrimitive(NotImplementedError):
    pass


def _sub(eqn: Any) -> ClosedJaxpr | Jaxpr:
    for k in _JAXPR_PARAMS:
        j = eqn.params.get(k)
        if isinstance(j, (ClosedJaxpr, Jaxpr)):
            return j
    raise UnmappedPrimitive(f"call primitive {eqn.primitive.name!r} has no sub-jaxpr")


class Program:
    """A jaxpr as a list of torch instructions over registers (see the module docstring)."""

    def __init__(self, jaxpr: ClosedJaxpr | Jaxpr, ops: SimpleNamespace, device: torch.device):
        consts = jaxpr.consts if isinstance(jaxpr, ClosedJaxpr) else []
        jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
        self.ops, self.device = ops, device
        slots: dict[Any, int] = {}
        self.init: list[Any] = []  # register template: constants and literals filled in

        def slot(v: Any) -> int:
            if isinstance(v, Literal):
                self.init.append(to_torch(np.asarray(v.val, v.aval.dtype), device))
                return len(self.init) - 1
            if v not in slots:
                slots[v] = len(self.init)
                self.init.append(None)
            return slots[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            self.init[slot(v)] = c if isinstance(c, torch.Tensor) else to_torch(c, device)
        self.inputs = [slot(v) for v in jaxpr.invars]
        self.instrs: list[tuple] = []
        last_use: dict[int, int] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            ins = [slot(v) for v in eqn.invars]
            for s in ins:
                last_use[s] = i
            outs = [None if type(v).__name__ == "DropVar" else slot(v) for v in eqn.outvars]
            fn = self._make(eqn)
            fixes = [_fixer(v.aval) for v in eqn.outvars]
            self.instrs.append((fn, ins, outs, fixes, eqn.primitive.multiple_results, []))
        self.outputs = [slot(v) for v in jaxpr.outvars]
        keep = set(self.outputs) | {s for s, c in enumerate(self.init) if c is not None}
        for s, i in last_use.items():
            if s not in keep:
                self.instrs[i][5].append(s)  # free intermediates after their last reader

    def _make(self, eqn: Any) -> Callable[..., Any]:
        name = eqn.primitive.name
        ins = [v.aval for v in eqn.invars]
        outs = [v.aval for v in eqn.outvars]
        if name in _CALLS:
            sub = Program(_sub(eqn), self.ops, self.device)
            return lambda *xs: sub(*xs)
        if name == "npu_attention":
            return make_attention(self.ops, **eqn.params)
        if name == "npu_write_kv":
            return make_write_kv(self.ops, **eqn.params)
        if name in _CONTROL:
            return _CONTROL[name](self, eqn.params)
        if name not in RULES:
            raise UnmappedPrimitive(
                f"the NPU executor has no torch mapping for JAX primitive {name!r} "
                f"(inputs {[str(a) for a in ins]}); add one to backends/npu/primitives.py")
        fn = RULES[name](dict(eqn.params), ins, outs)
        if getattr(fn, "needs_device", False):
            dev = self.device
            return lambda: fn(device=dev)
        return fn

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        regs = list(self.init)
        for s, a in zip(self.inputs, args, strict=True):
            regs[s] = a
        for fn, ins, outs, fixes, multi, frees in self.instrs:
            res = fn(*[regs[s] for s in ins])
            if not multi:
                res = (res,)
            for s, r, fix in zip(outs, res, fixes, strict=True):
                if s is not None:
                    regs[s] = fix(r)
            for s in frees:
                regs[s] = None
        return [regs[s] for s in self.outputs]


def _fixer(aval: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cast a result to the torch dtype of its JAX aval (and mask uint32 held in int64)."""
    if not hasattr(aval, "dtype"):
        return lambda x: x
    dt, shape = torch_dtype(aval.dtype), tuple(aval.shape)
    if is_wide_uint32(aval.dtype) and "key<" not in str(aval.dtype):
        return lambda x: x.to(dt) & MASK
    def fix(x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == dt else x.to(dt)
        if tuple(x.shape) != shape and "key<" not in str(aval.dtype):
            raise AssertionError(f"executor bug: result of shape {tuple(x.shape)}, "
                                 f"the jaxpr says {shape}")
        return x
    return fix


def _scan(prog: Program, params: dict[str, Any]) -> Callable[..., Any]:
    body = Program(params["jaxpr"], prog.ops, prog.device)
    n, nc, ncarry = params["length"], params["num_consts"], params["num_carry"]
    reverse = params["reverse"]

    def run(*args):
        consts, carry, xs = args[:nc], list(args[nc:nc + ncarry]), args[nc + ncarry:]
        ys: list[list[torch.Tensor]] = []
        for i in (range(n - 1, -1, -1) if reverse else range(n)):
            out = body(*consts, *carry, *[x[i] for x in xs])
            carry = out[:ncarry]
            ys.append(out[ncarry:])
        if reverse:
            ys.reverse()
        n_ys = len(body.outputs) - ncarry
        stacked = [torch.stack([y[j] for y in ys]) for j in range(n_ys)] if ys else []
        return [*carry, *stacked]
    return run


def _while(prog: Program, params: dict[str, Any]) -> Callable[..., Any]:
    cond = Program(params["cond_jaxpr"], prog.ops, prog.device)
    body = Program(params["body_jaxpr"], prog.ops, prog.device)
    nc, nb = params["cond_nconsts"], params["body_nconsts"]

    def run(*args):
        cc, bc, carry = args[:nc], args[nc:nc + nb], list(args[nc + nb:])
        while bool(cond(*cc, *carry)[0]):  # reads the predicate on the host
            carry = body(*bc, *carry)
        return carry
    return run


def _cond(prog: Program, params: dict[str, Any]) -> Callable[..., Any]:
    branches = [Program(b, prog.ops, prog.device) for b in params["branches"]]

    def run(index, *args):
        i = min(max(int(index), 0), len(branches) - 1)  # reads the index on the host
        return branches[i](*args)
    return run


_CONTROL = {"scan": _scan, "while": _while, "cond": _cond}

_JAX_DTYPE = {torch.float32: np.dtype("float32"), torch.float16: np.dtype("float16"),
              torch.bfloat16: jax.numpy.dtype("bfloat16"), torch.int32: np.dtype("int32"),
              torch.bool: np.dtype("bool"), torch.int8: np.dtype("int8"),
              torch.uint8: np.dtype("uint8")}


def _aval(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, torch.Tensor):
        if x.dtype not in _JAX_DTYPE:
            raise TypeError(f"a torch input of dtype {x.dtype} has no single JAX dtype")
        return jax.ShapeDtypeStruct(tuple(x.shape), _JAX_DTYPE[x.dtype])
    a = np.asarray(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)


class TorchJit:
    """`fn` (a JAX function of arrays; static settings as keywords) run with torch on
    `device`. Inputs: torch tensors (kept), numpy or JAX arrays (copied to the device).
    Returns the outputs' pytree of torch tensors; `out_avals(...)` gives their JAX types."""

    def __init__(self, fn: Callable[..., Any], ops: SimpleNamespace,
                 device: torch.device | str, static_argnums: tuple[int, ...] = ()) -> None:
        self.fn, self.ops, self.device = fn, ops, torch.device(device)
        self.static_argnums = static_argnums
        self.plans: dict[tuple, tuple[Program, Any, Any]] = {}

    def _split(self, args: tuple, static: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Positional static arguments (static_argnums) join the keyword ones."""
        if not self.static_argnums:
            return args, static
        static = {**static, **{f"_arg{i}": args[i] for i in self.static_argnums}}
        return tuple(a for i, a in enumerate(args) if i not in self.static_argnums), static

    def _call_fn(self, arrays: tuple, static: dict[str, Any]) -> Any:
        args, it = [], iter(arrays)
        for i in range(len(arrays) + len(self.static_argnums)):
            args.append(static[f"_arg{i}"] if i in self.static_argnums else next(it))
        return self.fn(*args, **{k: v for k, v in static.items() if not k.startswith("_arg")})

    def plan(self, args: tuple, static: dict[str, Any]) -> tuple[Program, Any, Any]:
        args, static = self._split(args, static)
        leaves, tree = jax.tree.flatten(args)
        avals = [_aval(x) for x in leaves]
        key = (tree, tuple((a.shape, a.dtype) for a in avals), tuple(sorted(static.items())))
        if key not in self.plans:  # once per bucket
            abstract = jax.tree.unflatten(tree, avals)
            closed, shapes = jax.make_jaxpr(lambda *a: self._call_fn(a, static),
                                            return_shape=True)(*abstract)
            self.plans[key] = (Program(closed, self.ops, self.device),
                               jax.tree.structure(shapes), shapes)
        return self.plans[key]

    def __call__(self, *args: Any, **static: Any) -> Any:
        prog, out_tree, _ = self.plan(args, static)
        ins = [x if isinstance(x, torch.Tensor) else to_torch(x, self.device)
               for x in jax.tree.leaves(self._split(args, static)[0])]
        with torch.no_grad():
            return jax.tree.unflatten(out_tree, prog(*ins))

    def out_avals(self, *args: Any, **static: Any) -> Any:
        return self.plan(args, static)[2]


def tree_to_numpy(tree: Any, avals: Any) -> Any:
    """Torch outputs back as numpy in their JAX dtypes (avals: TorchJit.out_avals)."""
    return jax.tree.map(lambda t, a: to_numpy(t, a.dtype), tree, avals)
