"""From HF-named checkpoint tensors to the model's parameter pytree, and random weights.

Layouts (the model's einsums read these):
  embed [V, E]; lm_head [E, V] (absent when tied); norm [E]
  per layer: attn_norm [E], wq [E, Hq, D], wk/wv [E, Hkv, D], wo [Hq, D, E],
             bq [Hq, D], bk/bv [Hkv, D] (Qwen2), q_norm/k_norm [D] (Qwen3),
             or once loaded, fused: wqkv [E, Hkv, G + 2, D], bqkv [Hkv, G + 2, D],
             mlp_norm [E], then a dense MLP: w_gate/w_up [E, F], w_down [F, E]
             (once loaded, fused: w_gate_up [E, F, 2], gate then up per MLP channel)
             or an MoE block: router [E, X], expert_gate/expert_up [X, E, F],
             expert_down [X, F, E] (experts stacked on a leading axis, F their width)

HF expert names: fused `mlp.experts.gate_up_proj` [X, 2F, E] (gate rows first) and
`mlp.experts.down_proj` [X, E, F] with router `mlp.gate.weight` [X, E] (transformers' own
state_dict, both archs); per expert `mlp.experts.{j}.{gate,up,down}_proj.weight` (Qwen3-MoE
checkpoints) or `block_sparse_moe.experts.{j}.{w1,w3,w2}.weight` with router
`block_sparse_moe.gate.weight` (Mixtral checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from engine.model.axes import PARAM_AXES, Axes, param_axes
from engine.model.config import ModelConfig
from engine.model.llama import Params
from engine.model.quant import BLOCK, BLOCK_BYTES, QuantizedWeight
from engine.model.transfer import put_all, to_device


def _experts_from_hf(t: Mapping[str, np.ndarray], p: str, cfg: ModelConfig
                     ) -> dict[str, np.ndarray]:
    """One layer's router and stacked experts (prefix p = "model.layers.{i}.")."""
    x, f = cfg.num_experts, cfg.moe_intermediate_size
    if p + "mlp.experts.gate_up_proj" in t:
        gate_up = t[p + "mlp.experts.gate_up_proj"]  # gate_up: [X, 2F, E]
        router, gate, up = t[p + "mlp.gate.weight"], gate_up[:, :f], gate_up[:, f:]
        down = t[p + "mlp.experts.down_proj"]  # down: [X, E, F]
    else:
        m, names = ((p + "block_sparse_moe.", ("w1", "w3", "w2"))
                    if p + "block_sparse_moe.gate.weight" in t
                    else (p + "mlp.", ("gate_proj", "up_proj", "down_proj")))
        # gate/up: [X, F, E], down: [X, E, F]; pre-quantized experts stack as stored
        e = cfg.hidden_size
        gate, up, down = (_stack_experts([t[f"{m}experts.{j}.{n}.weight"] for j in range(x)],
                                         (f,) if n in ("down_proj", "w2") else (e,),
                                         (e,) if n in ("down_proj", "w2") else (f,))
                          for n in names)
        return {"router": t[m + "gate.weight"].T, "expert_gate": gate, "expert_up": up,
                "expert_down": down}  # router: [E, X]
    return {"router": router.T, "expert_gate": gate.transpose(0, 2, 1),
            "expert_up": up.transpose(0, 2, 1), "expert_down": down.transpose(0, 2, 1)}


def _stack_experts(ws: list[np.ndarray | QuantizedWeight], in_shape: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> np.ndarray | QuantizedWeight:
    """Per-expert HF weights [N, K] -> [X, K, N]; QuantizedWeights stack their rows
    ([X, N, K bytes], scales [X, N(, K/G)]) and take the per-expert logical shapes."""
    if isinstance(ws[0], QuantizedWeight):
        stacked = jax.tree.map(lambda *a: np.stack(a), *ws)
        return dataclasses.replace(stacked, in_shape=in_shape, out_shape=out_shape)
    return np.stack(ws).transpose(0, 2, 1)


def _linear(w: np.ndarray | QuantizedWeight, in_shape: tuple[int, ...],
            out_shape: tuple[int, ...]) -> np.ndarray | QuantizedWeight:
    """An HF linear weight [N, K] as the logical [*in_shape, *out_shape]; a pre-quantized
    one (stored by output channel already) only takes the logical shapes."""
    if isinstance(w, QuantizedWeight):
        return dataclasses.replace(w, in_shape=in_shape, out_shape=out_shape)
    return w.T.reshape(*in_shape, *out_shape)


def _layer_from_hf(t: Mapping[str, np.ndarray], i: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    e, d, hq, hk = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    f = cfg.intermediate_size
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    lp = {
        "attn_norm": t[p + "input_layernorm.weight"],
        "wq": _linear(t[a + "q_proj.weight"], (e,), (hq, d)),
        "wk": _linear(t[a + "k_proj.weight"], (e,), (hk, d)),
        "wv": _linear(t[a + "v_proj.weight"], (e,), (hk, d)),
        "wo": _linear(t[a + "o_proj.weight"], (hq, d), (e,)),
        "mlp_norm": t[p + "post_attention_layernorm.weight"],
    }
    if cfg.is_moe:
        lp.update(_experts_from_hf(t, p, cfg))
    else:
        lp.update(w_gate=_linear(t[m + "gate_proj.weight"], (e,), (f,)),
                  w_up=_linear(t[m + "up_proj.weight"], (e,), (f,)),
                  w_down=_linear(t[m + "down_proj.weight"], (f,), (e,)))
    if cfg.qkv_bias:
        lp["bq"] = t[a + "q_proj.bias"].reshape(hq, d)
        lp["bk"] = t[a + "k_proj.bias"].reshape(hk, d)
        lp["bv"] = t[a + "v_proj.bias"].reshape(hk, d)
    if cfg.qk_norm:
        lp["q_norm"] = t[a + "q_norm.weight"]
        lp["k_norm"] = t[a + "k_norm.weight"]
    return lp


def stack_layers(layers: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


Place = Callable[[tuple[int, ...], Axes], Any]
"""(shape, logical axes) -> the sharding a parameter is made or put on (tensor parallelism)."""


def _sharding(place: Place | None, name: str, shape: tuple[int, ...]) -> Any:
    return place(shape, PARAM_AXES[name]) if place is not None else None


def place_weight(x: Any, axes: Axes, place: Place | None) -> Any:
    """An array or QuantizedWeight (host or device) on the device, or on its shards of the
    mesh (a QuantizedWeight's data, scales and zeros split with their rows:
    quantized_shardings)."""
    if place is None:
        return jax.tree.map(jnp.asarray, x)
    if isinstance(x, QuantizedWeight):
        return jax.tree.map(jax.device_put, x, quantized_shardings(x, axes, place))
    return jax.device_put(x, place(x.shape, axes))


def quantized_shardings(w: QuantizedWeight, axes: Axes,
                        place: Place
                        ) -> QuantizedWeight:
    """Where each array of a QuantizedWeight lives: a QuantizedWeight of NamedShardings.

    The logical weight [(L,) *in_shape, *out_shape] is placed by its axes; its stored rows
    [(L,) N, K bytes] then split along N when the outermost output dim is sharded (N is
    out_shape flattened, so that is a contiguous split of whole rows: heads with their
    head_dim, KV heads with their queries), and along K when the outermost input dim is
    (wo's heads, w_down's MLP width). A sharded inner dim would interleave rows: that
    weight is replicated instead. Scales and zero points follow their rows; grouped ones
    (int4, block-scaled fp8) split along K with the data, so a K split must not cut a
    group (or a GGUF 32-block): ValueError, naming the sizes, if it would."""
    nl = w.data.ndim - 2  # a leading layer axis when stacked
    lead_shape = tuple(w.data.shape[:nl])
    logical = place((*lead_shape, *w.in_shape, *w.out_shape), axes)
    mesh = logical.mesh
    spec = list(logical.spec) + [None] * (len(axes) - len(logical.spec))
    lead, ins = spec[:nl], spec[nl:nl + len(w.in_shape)]
    outs = spec[nl + len(w.in_shape):]
    n_axis = outs[0] if outs and not any(outs[1:]) else None
    k_axis = ins[0] if ins and not any(ins[1:]) else None
    if k_axis is not None:
        parts = mesh.shape[k_axis]
        unit = w.group_size if w.grouped else (BLOCK if w.fmt in BLOCK_BYTES else 1)
        if w.k % parts or (w.k // parts) % unit:
            raise ValueError(
                f"a {w.fmt} weight of K={w.k} ({unit} weights per scale block along K) "
                f"cannot be split {parts} ways along K for tensor parallelism: each shard's "
                f"{w.k / parts:g} weights would cut a block; use a tensor_parallel_size "
                f"that leaves a multiple of {unit} per shard")

    def sharding(*dims: str | None) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*lead, *dims))

    grouped = w.scales.ndim == w.data.ndim
    per_row = not grouped and w.scales.shape[-1] == w.n and w.n > 0
    scales = (sharding(n_axis, k_axis) if grouped else sharding(n_axis) if per_row
              else sharding(None))
    zeros = None if w.zeros is None else sharding(n_axis, k_axis)
    return QuantizedWeight(sharding(n_axis, k_axis), scales, w.fmt, w.in_shape,
                           w.out_shape, zeros)


def place_params(params: Params, place: Place | None) -> Params:
    """Every parameter on its sharding (after a change that may not keep them: stacking,
    quantizing at load)."""
    if place is None:
        return params
    axes = param_axes(params)
    for k in params:
        if k != "layers":
            params[k] = place_weight(params[k], axes[k], place)
    stacked = isinstance(params["layers"], dict)
    pairs = (zip([params["layers"]], [axes["layers"]], strict=True) if stacked
             else zip(params["layers"], axes["layers"], strict=True))
    for lp, lax_ in pairs:
        for n in lp:
            lp[n] = place_weight(lp[n], lax_[n], place)
    return params


def params_from_hf(
    tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: jnp.dtype, *, scan: bool,
    place: Place | None = None,
) -> Params:
    """Convert HF-named tensors: each is put on the device in its stored layout (or straight
    onto its shards with `place`: each device receives only its share, so a model larger
    than one device never exists whole on one), then transposed and cast to `dtype` there
    (engine.model.transfer); a few tensors at a time, overlapping file reads and transfers."""
    def put(x: np.ndarray | QuantizedWeight, name: str) -> jax.Array | QuantizedWeight:
        if isinstance(x, QuantizedWeight):  # pre-quantized: its arrays as stored
            return place_weight(x, PARAM_AXES[name], place)
        return to_device(np.asarray(x), dtype, _sharding(place, name, x.shape))

    layers = [_layer_from_hf(tensors, i, cfg) for i in range(cfg.num_layers)]
    top = {"embed": tensors["model.embed_tokens.weight"], "norm": tensors["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        top["lm_head"] = tensors["lm_head.weight"].T
    slots = [(lp, n) for lp in layers for n in lp] + [(top, n) for n in top]
    done = put_all([functools.partial(put, d[n], n) for d, n in slots],
                   parallel=jax.process_count() == 1)
    for (d, n), x in zip(slots, done, strict=True):
        d[n] = x
    params: Params = {"embed": top.pop("embed"), "norm": top.pop("norm"),
                      "layers": stack_layers(layers) if scan else layers, **top}
    return _place_stacked(params, place)


def _place_stacked(params: Params, place: Place | None) -> Params:
    """Stacked (scan) layers on their shardings too (stacking may not keep them)."""
    if place is None or not isinstance(params["layers"], dict):
        return params
    return place_params(params, place)


def random_params(cfg: ModelConfig, dtype: jnp.dtype, *, scan: bool, seed: int = 0,
                  place: Place | None = None) -> Params:
    """Random weights made on the device (`--load-format dummy`): no checkpoint needed.
    With `place`, each device generates only its own shard of every parameter."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hk, v = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    shapes = {"wq": (e, hq, d), "wk": (e, hk, d), "wv": (e, hk, d), "wo": (hq, d, e)}
    if cfg.is_moe:
        x, fx = cfg.num_experts, cfg.moe_intermediate_size
        shapes.update(router=(e, x), expert_gate=(x, e, fx), expert_up=(x, e, fx),
                      expert_down=(x, fx, e))
    else:
        shapes.update(w_gate=(e, f), w_up=(e, f), w_down=(f, e))
    if cfg.qkv_bias:
        shapes.update(bq=(hq, d), bk=(hk, d), bv=(hk, d))
    ones = {"attn_norm": (e,), "mlp_norm": (e,)}
    if cfg.qk_norm:
        ones.update(q_norm=(d,), k_norm=(d,))
    key = jax.random.key(seed)

    def normal(k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return (0.02 * jax.random.normal(k, shape)).astype(dtype)

    def make_layer(k):
        keys = jax.random.split(k, len(shapes))
        lp = {n: normal(kk, s) for (n, s), kk in zip(shapes.items(), keys, strict=True)}
        lp.update({n: jnp.ones(s, dtype) for n, s in ones.items()})
        return lp

    out = {n: _sharding(place, n, s) for n, s in {**shapes, **ones}.items()}
    make_layer = jax.jit(make_layer, out_shardings=out if place is not None else None)
    keys = jax.random.split(key, cfg.num_layers + 2)
    layers = [make_layer(keys[i]) for i in range(cfg.num_layers)]

    def made(name: str, shape: tuple[int, ...], fn: Callable[[], jax.Array]) -> jax.Array:
        return jax.jit(fn, out_shardings=_sharding(place, name, shape))()

    params: Params = {
        "embed": made("embed", (v, e), lambda: normal(keys[-1], (v, e))),
        "norm": made("norm", (e,), lambda: jnp.ones((e,), dtype)),
        "layers": stack_layers(layers) if scan else layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = made("lm_head", (e, v), lambda: normal(keys[-2], (e, v)))
    return _place_stacked(params, place)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in a pytree (weights, a KV cache; arrays or their shapes)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def fuse_qkv(params: Params, place: Place | None = None) -> Params:
    """wq/wk/wv (and bq/bk/bv) -> one wqkv [E, Hkv, G + 2, D] (bqkv [Hkv, G + 2, D]): per KV
    head its G query heads (q head h is KV head h // G's), then its K and V head, so that a
    step makes one q/k/v GEMM and tensor parallelism splits whole KV heads with their
    queries. Without it XLA merges the three GEMMs itself, reading the three weights inside
    one GEMM: 2.8 TB/s on an H200 at batch 1, where the gate/up GEMMs (one weight each)
    stream at 3.9 TB/s (the 2026-12-01 profile in docs/benchmarks.md).

    In place, layer by layer: each layer's parts are dropped once fused (placed like the
    parameters they replace), so memory peaks at one layer's q/k/v more."""
    stacked = isinstance(params["layers"], dict)
    for lp in [params["layers"]] if stacked else params["layers"]:
        for w, (q, k, v) in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            if q not in lp:
                continue
            if isinstance(lp[q], QuantizedWeight):
                fused = fuse_quantized(lp[q], lp[k], lp[v])
                if fused is not None:
                    axes = (("layers",) if stacked else ()) + PARAM_AXES[w]
                    lp[w] = place_weight(fused, axes, place)
                    del lp[q], lp[k], lp[v]
                continue
            shape = jax.eval_shape(_fuse, lp[q], lp[k], lp[v]).shape
            axes = (("layers",) if stacked else ()) + PARAM_AXES[w]
            f = _fuse_jit(place(shape, axes) if place is not None else None)
            lp[w] = f(lp.pop(q), lp.pop(k), lp.pop(v))
    return params


def fuse_quantized(q: QuantizedWeight, k: QuantizedWeight, v: QuantizedWeight
                   ) -> QuantizedWeight | None:
    """fuse_qkv's order for stored rows: the output rows (data, scales and zero points
    alike) of q [Hq*D], k and v [Hkv*D] reordered as [Hkv, G + 2, D]. None when the three
    differ in format or grouping (they then stay three weights)."""
    parts = (q, k, v)
    if (len({w.fmt for w in parts}) > 1 or len({w.data.shape[-1] for w in parts}) > 1
            or len({w.scales.shape[-1] if w.grouped else -1 for w in parts}) > 1):
        return None
    (hq, d), hkv = q.out_shape, k.out_shape[0]
    nl = q.data.ndim - 2  # a leading layer axis when stacked

    def rows(a: jax.Array, heads: int) -> jax.Array:  # [(L,) H*D, ...] -> [(L,) Hkv, g, D, ...]
        return a.reshape(*a.shape[:nl], hkv, heads // hkv, d, *a.shape[nl + 1:])

    def fuse(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
        if a.shape[nl] != hq * d:  # empty scales [(L,) 0]: nothing per row
            return a
        out = jnp.concatenate([rows(a, hq), rows(b, hkv), rows(c, hkv)], axis=nl + 1)
        return out.reshape(*a.shape[:nl], -1, *a.shape[nl + 1:])  # [(L,) Hkv*(G+2)*D, ...]

    zeros = None if q.zeros is None else fuse(q.zeros, k.zeros, v.zeros)
    return QuantizedWeight(fuse(q.data, k.data, v.data), fuse(q.scales, k.scales, v.scales),
                           q.fmt, q.in_shape, (hkv, hq // hkv + 2, d), zeros)


def unfuse_qkv(params: Params, place: Place | None = None) -> Params:
    """The inverse of fuse_qkv, for fused weights read back (an orbax checkpoint) where the
    engine keeps q/k/v apart (--no-fuse-qkv, or a mesh that splits the query heads but
    replicates the KV heads). In place; quantized weights stay fused."""
    def split(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        *lead, hkv, g2, d = w.shape  # [..., Hkv, G + 2, D]
        return w[..., :g2 - 2, :].reshape(*lead, hkv * (g2 - 2), d), w[..., g2 - 2, :], \
            w[..., g2 - 1, :]

    stacked = isinstance(params["layers"], dict)
    for lp in [params["layers"]] if stacked else params["layers"]:
        for w, names in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            if not isinstance(lp.get(w), jax.Array):
                continue
            shapes = [s.shape for s in jax.eval_shape(split, lp[w])]
            lead = ("layers",) if stacked else ()
            out = tuple(place(s, lead + PARAM_AXES[n]) for s, n in zip(shapes, names,
                                                                        strict=True)) \
                if place is not None else None
            parts = jax.jit(split, out_shardings=out)(lp.pop(w))
            lp.update(zip(names, parts, strict=True))
    return params


def fuse_gate_up(params: Params, place: Place | None = None) -> Params:
    """w_gate/w_up [E, F] -> one w_gate_up [E, F, 2] (gate, up per MLP channel), so that the
    MLP makes one GEMM and SiLU(gate) * up reads the two halves of its output. F stays the
    outer output dim: tensor parallelism splits it like w_gate's and w_down's (each device
    keeps the gate and up columns of its own channels), and a QuantizedWeight's rows
    (out_shape (F, 2): row 2f is gate f, row 2f + 1 up f) split as whole channels. The
    2026-12-01 H200 profile spent 64 GEMM kernels a step on gate and up apart.

    In place, layer by layer, as fuse_qkv; MoE layers (no w_gate) are left alone. Quantized
    parts of different formats or groupings stay two weights."""
    stacked = isinstance(params["layers"], dict)
    axes = (("layers",) if stacked else ()) + PARAM_AXES["w_gate_up"]
    for lp in [params["layers"]] if stacked else params["layers"]:
        if "w_gate" not in lp or "w_up" not in lp:
            continue
        if isinstance(lp["w_gate"], QuantizedWeight):
            fused = fuse_quantized_gate_up(lp["w_gate"], lp["w_up"])
            if fused is not None:
                lp["w_gate_up"] = place_weight(fused, axes, place)
                del lp["w_gate"], lp["w_up"]
            continue
        if isinstance(lp["w_up"], QuantizedWeight):
            continue
        shape = jax.eval_shape(_stack_last, lp["w_gate"], lp["w_up"]).shape
        f = _stack_jit(place(shape, axes) if place is not None else None)
        lp["w_gate_up"] = f(lp.pop("w_gate"), lp.pop("w_up"))
    return params


def fuse_quantized_gate_up(gate: Any, up: Any) -> QuantizedWeight | None:
    """fuse_gate_up's order for stored rows: gate's and up's rows [(L,) F, ...] (data,
    scales, zero points) interleaved as [(L,) F, 2, ...]. None unless both are
    QuantizedWeights of one format and grouping."""
    if not (isinstance(gate, QuantizedWeight) and isinstance(up, QuantizedWeight)):
        return None
    if (gate.fmt != up.fmt or gate.data.shape != up.data.shape
            or gate.scales.shape != up.scales.shape
            or (gate.zeros is None) != (up.zeros is None)):
        return None
    nl = gate.data.ndim - 2  # a leading layer axis when stacked

    def fuse(a: Any, b: Any) -> Any:
        if a.ndim <= nl or a.shape[nl] != gate.n:  # empty scales [(L,) 0]: nothing per row
            return a
        xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
        out = xp.stack([a, b], axis=nl + 1)  # [(L,) F, 2, ...]
        return out.reshape(*a.shape[:nl], -1, *a.shape[nl + 1:])  # [(L,) 2F, ...]

    zeros = None if gate.zeros is None else fuse(gate.zeros, up.zeros)
    return QuantizedWeight(fuse(gate.data, up.data), fuse(gate.scales, up.scales), gate.fmt,
                           gate.in_shape, (*gate.out_shape, 2), zeros)


def unfuse_gate_up(params: Params, place: Place | None = None) -> Params:
    """The inverse of fuse_gate_up for float weights read back fused (an orbax checkpoint)
    where the engine keeps gate and up apart (--no-fuse-gate-up). In place; quantized
    weights stay fused (the model reads either form)."""
    stacked = isinstance(params["layers"], dict)
    lead = ("layers",) if stacked else ()
    for lp in [params["layers"]] if stacked else params["layers"]:
        if not isinstance(lp.get("w_gate_up"), jax.Array):
            continue
        w = lp.pop("w_gate_up")  # [(L,) E, F, 2]
        sh = place(w.shape[:-1], lead + PARAM_AXES["w_gate"]) if place is not None else None
        parts = jax.jit(lambda a: (a[..., 0], a[..., 1]), out_shardings=(sh, sh))(w)
        lp.update(w_gate=parts[0], w_up=parts[1])
    return params


def _stack_last(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.stack([a, b], axis=-1)


@functools.lru_cache(maxsize=64)
def _stack_jit(sharding: Any) -> Callable:
    """One jitted gate/up fusion per output sharding, kept (as _fuse_jit)."""
    return jax.jit(_stack_last, out_shardings=sharding)


def _fuse(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    *lead, hq, d = q.shape
    hkv = k.shape[-2]
    q = q.reshape(*lead, hkv, hq // hkv, d)  # [..., Hkv, G, D]
    return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


@functools.lru_cache(maxsize=64)
def _fuse_jit(sharding: Any) -> Callable:
    """One jitted fusion per output sharding, kept: weight updates fuse every layer again,
    and a fresh jit per call compiled each time (seconds per update)."""
    return jax.jit(_fuse, out_shardings=sharding)
