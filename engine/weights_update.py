"""New weights for a serving engine (RL rollouts: a trainer pushes its parameters after each
step), in-process (`LLM.update_weights`) or from disk (`POST /update_weights_from_disk`).

New weights go through what start-up applied to the loaded ones (a `WeightRecipe`: q/k/v
and gate/up fusion, the configured quantization), are checked against the serving params
(tree, shapes, dtypes) and are placed on the serving params' shardings, so the compiled step
programs are reused as they are. The swap itself happens between steps, with no request running, and
flushes the prefix cache (its K/V were computed by the old weights).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.model.config import ModelConfig
from engine.model.weights import (
    Place,
    _layer_from_hf,
    fuse_gate_up,
    fuse_qkv,
    place_params,
    random_params,
    unfuse_gate_up,
    unfuse_qkv,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WeightRecipe:
    """What start-up does to loaded weights, kept so that new weights get the same."""

    cfg: ModelConfig
    dtype: Any
    """The weights' float dtype (before any quantization)."""
    scan: bool
    """Layers stacked on a leading axis (lax.scan) rather than a list."""
    fuse: bool
    """wq/wk/wv fused into wqkv (engine.model.weights.fuse_qkv)."""
    quantization: str | None
    """engine.loader.quantize method applied after fusion, or None."""
    place: Place | None = None
    """(shape, logical axes) -> sharding under a mesh; None on one device."""
    fuse_gate_up: bool = True
    """w_gate/w_up fused into w_gate_up (engine.model.weights.fuse_gate_up)."""

    def finish(self, params: Params, path: Any = None) -> Params:
        """Fuse and quantize float weights as start-up did (in place; returned). `path`: the
        checkpoint file, which quantization 'gguf' reads its blocks from."""
        if self.fuse:
            fuse_qkv(params, self.place)
        else:  # weights read back fused (orbax) where this engine keeps them apart
            unfuse_qkv(params, self.place)
        if self.fuse_gate_up:
            fuse_gate_up(params, self.place)
        else:
            unfuse_gate_up(params, self.place)
        if self.quantization is not None:  # QuantizedWeights, on their shards under a mesh
            from engine.loader.quantize import quantize_params

            quantize_params(params, self.cfg, self.quantization, path)
            place_params(params, self.place)
        return params

    def raw_spec(self) -> Params:
        """ShapeDtypeStructs of the float weights as loaded (unfused, unquantized)."""
        return jax.eval_shape(functools.partial(random_params, self.cfg, jnp.dtype(self.dtype),
                                                scan=self.scan))


def is_hf_named(tree: Any) -> bool:
    """A flat mapping of HF tensor names (model.layers.0.self_attn.q_proj.weight, ...)."""
    return isinstance(tree, Mapping) and any(
        isinstance(k, str) and (k.startswith("model.") or k == "lm_head.weight") for k in tree)


def from_hf_names(tensors: Mapping[str, Any], cfg: ModelConfig, scan: bool) -> Params:
    """HF-named tensors (HF layouts) -> the model's float parameter tree, with the loaders'
    mapping (engine.model.weights); device arrays stay on their devices (transposes and
    reshapes run where the arrays are). Names and HF shapes are checked first against the
    loaders' table: a ValueError names the first missing, unexpected or misshapen tensor."""
    from engine.loader.checkpoint import expected_shapes

    want = expected_shapes(cfg, set(tensors))
    if cfg.tie_word_embeddings:  # the tied head's copy, which some checkpoints keep
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    for name, shape in want.items():
        if name not in tensors:
            raise ValueError(f"the HF-named weights lack {name}")
        if tuple(np.shape(tensors[name])) != shape:
            raise ValueError(f"parameter {name}: the new weights have shape "
                             f"{tuple(np.shape(tensors[name]))}, the serving model {shape}")
    extra = [k for k in tensors if k not in want]
    if extra:
        raise ValueError(f"the HF-named weights have unexpected tensors: {', '.join(extra[:3])}")
    layers = [_layer_from_hf(tensors, i, cfg) for i in range(cfg.num_layers)]
    params: Params = {"embed": tensors["model.embed_tokens.weight"],
                      "norm": tensors["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = tensors["lm_head.weight"].T
    params["layers"] = (jax.tree.map(lambda *xs: jnp.stack(xs), *layers) if scan else layers)
    return params


def _paths(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves}


def check_tree(new: Any, want: Any) -> None:
    """ValueError unless `new` has `want`'s tree (names, quantized formats), shapes and
    dtypes; the message names the first offending parameter."""
    if jax.tree.structure(new) != jax.tree.structure(want):
        got, exp = _paths(new), _paths(want)
        missing = [p for p in exp if p not in got]
        extra = [p for p in got if p not in exp]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has an unexpected {extra[0]}"
            raise ValueError(f"the new weights' tree differs from the serving model's: it "
                             f"{what} ({len(missing)} missing, {len(extra)} unexpected)")
        raise ValueError(f"the new weights' tree differs from the serving model's "
                         f"({jax.tree.structure(new)} vs {jax.tree.structure(want)})")
    for (path, x), y in zip(_paths(new).items(), jax.tree.leaves(want), strict=True):
        if tuple(np.shape(x)) != tuple(y.shape) or jnp.dtype(x.dtype) != jnp.dtype(y.dtype):
            raise ValueError(f"parameter {path}: the new weights have shape {tuple(np.shape(x))}"
                             f" {jnp.dtype(x.dtype)}, the serving model {tuple(y.shape)} "
                             f"{jnp.dtype(y.dtype)}")


def commit(params: Any) -> Any:
    """Every array committed to its sharding (a no-op copy-free put where it was not): the
    step programs are compiled for committed params, which every update brings (jit tells
    committed and uncommitted arguments apart, and would compile the step again)."""
    return jax.tree.map(lambda a: a if a.committed else jax.device_put(a, a.sharding), params)


def place_like(new: Any, current: Any) -> Any:
    """`new` on `current`'s shardings: a device array already placed so is kept as it is (no
    copy, no host round trip); others (another sharding, host arrays) are device_put."""
    def put(x: Any, cur: jax.Array) -> jax.Array:
        if (isinstance(x, jax.Array) and x.committed
                and x.sharding.is_equivalent_to(cur.sharding, x.ndim)):
            return x
        return jax.device_put(x, cur.sharding)

    return jax.tree.map(put, new, current)


def _copy_dicts(tree: Params) -> Params:
    """New dicts and lists down to the arrays, so that fusing in place leaves the caller's
    tree as it was."""
    layers = tree["layers"]
    out = {k: v for k, v in tree.items() if k != "layers"}
    out["layers"] = dict(layers) if isinstance(layers, Mapping) else [dict(lp) for lp in layers]
    return out


def prepare(tree: Any, current: Params, recipe: WeightRecipe, path: Any = None,
            name_map: Mapping[str, str] | None = None, backend: Any = None) -> Params:
    """New weights, ready to swap in for `current`. `tree`: the model's parameter tree in
    its serving form (fused, quantized: another engine's params), or its float form as
    loaded (wq/wk/wv, unquantized), or a flat mapping of HF names (renamed first by
    `name_map`, the caller's name -> HF name). `backend` (the serving engine's) prepares
    them as it did at load (Backend.prepare_weights). Raises ValueError on any mismatch."""
    if name_map is not None:
        tree = {name_map.get(k, k): v for k, v in tree.items()}
    if is_hf_named(tree):
        tree = from_hf_names(tree, recipe.cfg, recipe.scan)
    if not isinstance(tree, Mapping) or "layers" not in tree:
        raise ValueError("the new weights must be the model's parameter tree (embed, norm, "
                         "layers, ...) or a mapping of HF tensor names")
    prepared = False
    if jax.tree.structure(tree) != jax.tree.structure(current) and backend is not None:
        # Serving form in the shared formats where this backend's own layout changes the
        # tree's structure (the CPU's packed q4_1x, ... are other formats): prepared first.
        mine = backend.prepare_weights(_copy_dicts(dict(tree)))
        if jax.tree.structure(mine) == jax.tree.structure(current):
            tree, prepared = mine, True
    if jax.tree.structure(tree) != jax.tree.structure(current):
        check_tree(tree, recipe.raw_spec())  # float weights as loaded: fuse and quantize
        tree = recipe.finish(_copy_dicts(dict(tree)), path)
    if backend is not None and not prepared:  # as at load (ROCm on MI300: fp8 in e4m3fnuz)
        tree = backend.prepare_weights(tree)
    check_tree(tree, current)
    return place_like(tree, current)


def check_architecture(new: ModelConfig, serving: ModelConfig) -> None:
    """ValueError unless the new checkpoint's config is the serving model's (its token ids
    aside: they do not change what the weights compute)."""
    skip = {"bos_token_id", "eos_token_ids"}
    for f in dataclasses.fields(serving):
        a, b = getattr(new, f.name), getattr(serving, f.name)
        if f.name not in skip and a != b:
            raise ValueError(f"the new checkpoint's architecture differs: {f.name}={a!r}, the "
                             f"serving model has {f.name}={b!r}")


def swap(engine: Any, params: Params, version: str | None = None) -> str:
    """Serve `params` from the next step on (nothing may be running: the caller drained or
    aborted); the prefix cache is flushed. Returns the new weight version."""
    if engine.has_unfinished() or engine.scheduler.has_work():
        raise RuntimeError("weights are swapped only while no request runs")
    if engine.runner.mirror is not None:
        raise ValueError("weight updates are single-process only: the followers of a "
                         "multi-host server would keep the old weights")
    engine.runner.params = params
    if not engine.scheduler.flush_cache():
        raise RuntimeError("the prefix cache could not be flushed")
    engine.weight_updates += 1
    # The caller's version string (as SGLang takes one), else the count of updates.
    engine.weight_version = version if version is not None else str(engine.weight_updates)
    return engine.weight_version
