"""The one model definition for the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2)
and its mixture-of-experts variants (Mixtral, Qwen3-MoE: engine.model.moe).

Backend-neutral JAX: attention goes through the `attend` callable the runner passes in
(the backend's kernel for a mixed ragged batch over the paged KV cache).

Einsum letters: t = token, e = hidden (E), h = head, k = kv head, g = query heads per kv
head, c = a KV head's fused q/k/v columns (G + 2) or, in the MLP, gate and up (2),
d = head dim (D), f = MLP width (F), v = vocab, x = expert (X).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.attention import AttentionMetadata, write_kv
from engine.model.config import ModelConfig
from engine.model.moe import moe_ffn
from engine.model.quant import QuantizedWeight, embed_rows, reference_linear

Params = dict[str, Any]
KVCache = Any  # list of (K, V) per layer, or a stacked (K [L,...], V [L,...]) under scan
Attend = Callable[..., jax.Array]  # (q, k_cache, v_cache, md, *, layer) -> [T, Hq, D]
WriteKV = Callable[..., tuple[jax.Array, jax.Array]]  # (k_cache, v_cache, k, v, slots, layer)
Linear = Callable[[jax.Array, QuantizedWeight], jax.Array]  # x [T, *in] -> [T, *out]
AddNorm = Callable[..., tuple[jax.Array, jax.Array]]  # (x, y, w, eps) -> (normed, x + y)


def project(x: jax.Array, w: Any, eq: str, linear: Linear) -> jax.Array:
    """A projection: the einsum `eq` for a plain weight, the backend's `linear` for a
    QuantizedWeight (engine.model.quant; the same logical weight, stored by output channel)."""
    if isinstance(w, QuantizedWeight):
        return linear(x, w)
    return jnp.einsum(eq, x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm(x: jax.Array, y: jax.Array, w: jax.Array, eps: float
                 ) -> tuple[jax.Array, jax.Array]:
    """A residual add and the next norm: x, y [T, E], w [E] -> (rms_norm(x + y) * w, x + y),
    the sum in x's dtype. A backend may run both in one kernel (Backend.add_rms_norm): XLA
    makes two, because the sum has two consumers (the norm and the next residual add)."""
    s = x + y
    return rms_norm(s, w, eps), s


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2], with Llama 3.1 ('llama3') or linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = cfg.rope_scaling_dict
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept; between, interpolate.
        smooth = np.clip((old_len / wavelen - lo) / (hi - lo), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the HF layout). x: [T, H, D], positions: [T]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_block(
    lp: Params, h: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
    md: AttentionMetadata, cfg: ModelConfig, attend: Attend, layer: jax.Array | None,
    write: WriteKV = write_kv, linear: Linear = reference_linear,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h: the normed residual [T, E] -> (the block's output [T, E], to be added to the
    residual, and the written caches)."""
    if "wqkv" in lp:  # one GEMM (engine.model.weights.fuse_qkv); c = G query heads, K, V
        qkv = project(h, lp["wqkv"], "te,ekcd->tkcd", linear)
        if cfg.qkv_bias:
            qkv = qkv + lp["bqkv"]
        g = qkv.shape[2] - 2
        q = qkv[:, :, :g].reshape(qkv.shape[0], -1, qkv.shape[3])  # q head = kv head * G + g
        k, v = qkv[:, :, g], qkv[:, :, g + 1]
    else:
        q = project(h, lp["wq"], "te,ehd->thd", linear)  # q: [T, Hq, D]
        k = project(h, lp["wk"], "te,ekd->tkd", linear)  # k: [T, Hkv, D]
        v = project(h, lp["wv"], "te,ekd->tkd", linear)  # v: [T, Hkv, D]
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, md.positions, inv_freq)
    k = apply_rope(k, md.positions, inv_freq)
    k_cache, v_cache = write(k_cache, v_cache, k, v, md.slot_mapping, layer)
    o = attend(q, k_cache, v_cache, md, layer=layer)  # o: [T, Hq, D]
    return project(o, lp["wo"], "thd,hde->te", linear), k_cache, v_cache


def mlp_block(lp: Params, h: jax.Array, linear: Linear = reference_linear) -> jax.Array:
    """h: the normed residual [T, E] -> the MLP's output [T, E] (added to the residual by
    the next norm)."""
    if "w_gate_up" in lp:  # one GEMM (engine.model.weights.fuse_gate_up); c = gate, up
        gu = project(h, lp["w_gate_up"], "te,efc->tfc", linear)  # gu: [T, F, 2]
        gate, up = gu[..., 0], gu[..., 1]
    else:
        gate = project(h, lp["w_gate"], "te,ef->tf", linear)  # gate, up: [T, F]
        up = project(h, lp["w_up"], "te,ef->tf", linear)
    return project(jax.nn.silu(gate) * up, lp["w_down"], "tf,fe->te", linear)


Stream = tuple[jax.Array, jax.Array]
"""(x, dx): the residual stream [T, E] and the last block's output [T, E] not yet added to
it (zeros before the first layer). Each block's add is made by the next norm (`add_norm`),
one kernel where the backend fuses the two."""


def decoder_layer(
    lp: Params, xs: Stream, kv: tuple[jax.Array, jax.Array],
    md: AttentionMetadata, cfg: ModelConfig, attend: Attend, layer: jax.Array | None = None,
    write: WriteKV = write_kv, expert_axis: str | None = None,
    linear: Linear = reference_linear, add_norm: AddNorm = add_rms_norm,
) -> tuple[Stream, tuple[jax.Array, jax.Array]]:
    """`kv` is this layer's (K, V), or all layers' stacked caches with `layer` the index."""
    eps = cfg.rms_norm_eps
    h, x = add_norm(xs[0], xs[1], lp["attn_norm"], eps)
    o, k_cache, v_cache = attention_block(lp, h, kv[0], kv[1], md, cfg, attend, layer, write,
                                          linear)
    h, x = add_norm(x, o, lp["mlp_norm"], eps)
    dx = moe_ffn(lp, h, cfg, expert_axis) if cfg.is_moe else mlp_block(lp, h, linear)
    return (x, dx), (k_cache, v_cache)


_traced_layer = jax.jit(decoder_layer, static_argnames=("cfg", "attend", "write", "expert_axis",
                                                       "linear", "add_norm"))
"""decoder_layer as one jitted call, for the unrolled loop: every layer of a step shares one
trace and one lowering (a function the step's module calls per layer) instead of tracing and
lowering the layer's ops once per layer; XLA inlines the calls before optimizing, so the
compiled program is the same. A warm start (programs loaded from the persistent cache) pays
this tracing and lowering for every program."""


def forward(
    params: Params, kv: KVCache, tokens: jax.Array, md: AttentionMetadata,
    logits_idx: jax.Array, *, cfg: ModelConfig, attend: Attend, write: WriteKV = write_kv,
    expert_axis: str | None = None, linear: Linear = reference_linear,
    add_norm: AddNorm = add_rms_norm, capture: tuple[int, ...] = (),
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
    """tokens [T] -> (logits f32 [S, V] at rows `logits_idx` [S], updated KV cache).

    `write` puts this step's K/V into the cache (the backend's, for its own KV layout).
    `params["layers"]` is a list of per-layer dicts (unrolled loop) or one dict of arrays
    stacked on a leading layer axis (lax.scan); the KV cache has the matching form.
    `expert_axis` names the mesh axis the MoE expert weights are split over, for the
    shard_map expert-parallel path (engine.model.moe); None leaves partitioning to XLA.
    `linear` runs the projections whose weights are quantized (engine.model.quant);
    `add_norm` each residual add with the norm after it (add_rms_norm, or a backend's kernel).
    `capture`: layer indices whose input (the residual stream entering that layer, i.e. the
    output of the layer before, its last add included) is also returned, as aux
    [T, len(capture) * E] in the order given (EAGLE-3 speculation, engine.spec.eagle);
    empty: no third output, no extra work.
    """
    x = embed_rows(params["embed"], tokens, params["norm"].dtype)  # x: [T, E]
    xs = (x, jnp.zeros_like(x))  # Stream: nothing to add before the first layer
    aux = [x] * len(capture)  # placeholders until the captured layer is reached
    if isinstance(params["layers"], dict):
        def body(carry, lp_and_l):
            xs, kv_all, got = carry
            lp, li = lp_and_l
            got = tuple(jnp.where(li == c, xs[0] + xs[1], g)
                        for c, g in zip(capture, got, strict=True))
            xs, kv_all = decoder_layer(lp, xs, kv_all, md, cfg, attend, li, write, expert_axis,
                                       linear, add_norm)
            return (xs, kv_all, got), None

        layer_ids = jnp.arange(cfg.num_layers)
        (xs, kv, got), _ = jax.lax.scan(body, (xs, tuple(kv), tuple(aux)),
                                        (params["layers"], layer_ids))
        aux = list(got)
    else:
        new_kv = []
        for i, (lp, layer_kv) in enumerate(zip(params["layers"], kv, strict=True)):
            if i in capture:
                aux = [xs[0] + xs[1] if c == i else a for c, a in zip(capture, aux, strict=True)]
            xs, layer_kv = _traced_layer(lp, xs, layer_kv, md, cfg=cfg, attend=attend,
                                         write=write, expert_axis=expert_axis, linear=linear,
                                         add_norm=add_norm)
            new_kv.append(layer_kv)
        kv = new_kv
    x = xs[0][logits_idx] + xs[1][logits_idx]  # the last MLP's add, on the rows read
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)  # x: [S, E]
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if isinstance(head, QuantizedWeight):  # stored [V, E] by output channel either way
        logits = linear(x.astype(jnp.float32), head)
    else:
        head = head.T if cfg.tie_word_embeddings else head  # [E, V]
        logits = jnp.einsum("se,ev->sv", x, head, preferred_element_type=jnp.float32)
    if capture:
        return logits, kv, jnp.concatenate(aux, axis=-1)  # aux: [T, C * E]
    return logits, kv
