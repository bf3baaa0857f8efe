"""Run in a subprocess with 2 forced CPU devices: load an HF folder onto one device and onto
a tensor-parallel mesh of 2; print one JSON line: the parameters whose values differ, those
not on their target sharding, and those the mesh splits.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.loader.tp_load_worker DIR
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from engine.loader.hf import load_hf
from engine.model.axes import param_axes
from engine.parallel.sharding import make_rules, named_sharding


def main(folder: str) -> None:
    from engine.model.weights import params_from_hf

    ckpt = load_hf(Path(folder), progress=False)
    one = params_from_hf(ckpt.tensors, ckpt.config, jnp.bfloat16, scan=False)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    place = functools.partial(named_sharding, mesh=mesh, rules=make_rules(False))
    tp = params_from_hf(ckpt.tensors, ckpt.config, jnp.bfloat16, scan=False, place=place)
    axes = param_axes(tp)
    mismatched, wrong, split = [], [], set()
    flat_tp = jax.tree.leaves_with_path(tp)
    flat_axes = dict(jax.tree.leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for (path, a), b in zip(flat_tp, jax.tree.leaves(one), strict=True):
        name = jax.tree_util.keystr(path)
        if not np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)):
            mismatched.append(name)
        want = place(a.shape, flat_axes[path])
        if not a.sharding.is_equivalent_to(want, a.ndim):
            wrong.append(name)
        if not a.sharding.is_fully_replicated:
            split.add(str(path[-1].key))
    print(json.dumps({"mismatched": mismatched, "wrong_sharding": wrong,
                      "split": sorted(split)}))


if __name__ == "__main__":
    main(sys.argv[1])
