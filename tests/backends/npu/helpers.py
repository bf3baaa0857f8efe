"""Run one JAX function both ways: jax.jit (XLA on the CPU) and the NPU backend's torch
executor on CPU torch with the reference ops; compare the outputs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from backends.npu.dtypes import to_numpy
from backends.npu.executor import TorchJit
from backends.npu.kernels import reference_ops


def run_torch(fn: Any, *args: Any, static_argnums: tuple[int, ...] = ()) -> Any:
    tj = TorchJit(fn, reference_ops(), "cpu", static_argnums)
    out = tj(*args)
    return jax.tree.map(lambda t, a: to_numpy(t, a.dtype), out, tj.out_avals(*args))


def assert_same(fn: Any, *args: Any, rtol: float = 2e-6, atol: float = 1e-6) -> None:
    """The executor's outputs equal jax.jit's: exactly for integers and booleans, within
    rtol/atol for floats (transcendentals may differ in the last bits)."""
    want = jax.tree.map(np.asarray, jax.jit(fn)(*args))
    got = run_torch(fn, *args)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                            strict=True):
        where = jax.tree_util.keystr(path)  # names the op when outputs are keyed by op
        assert (w.shape, w.dtype) == (g.shape, g.dtype), (where, w.shape, w.dtype, g.shape,
                                                          g.dtype)
        if np.issubdtype(w.dtype, np.inexact) or w.dtype.name == "bfloat16":
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=rtol,
                                       atol=atol, equal_nan=True, err_msg=where)
        else:
            np.testing.assert_array_equal(g, w, err_msg=where)
