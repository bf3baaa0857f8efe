"""Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): router, top-k, grouped expert matmul.

Every token picks K of X experts; each expert is a SwiGLU MLP of width F. The T*K
token-expert assignments are sorted by expert, so each expert's rows form one contiguous
group, and `jax.lax.ragged_dot` multiplies every group by its own expert's weights in one op
(no Python loop over experts). The rows are then put back in assignment order and summed
per token, weighted by the router. (Seen with jax 0.10 on CPU and 0.11 on CUDA: ragged_dot
becomes one masked dense product over all the experts a device holds,
[T*K, X*E] @ [X*E, F]: exact, but X times the needed FLOPs and a [T*K, X*E] temporary; a
grouped-matmul kernel would remove that.)

Expert parallelism: the expert weights [X, ...] sharded over a mesh axis.
  * expert_axis="<mesh axis>": shard_map over that axis of the mesh in context
    (`jax.set_mesh`): each device routes every token (the router is replicated), sorts
    only the assignments to its own X/n experts, runs its ragged_dot, and one psum of the
    [T, E] outputs combines the devices. No expert weights move.
  * expert_axis=None: plain jit; the result is still right when the experts are sharded,
    but on CUDA (jax 0.11) XLA's SPMD partitioner all-gathers the expert weights for ragged_dot
    (every device computes every expert), so use this only unsharded or with the experts'
    width (F) sharded, which XLA partitions without gathering (one all-reduce).
The model does not know the mesh; the caller passes the axis name.

Einsum letters: t = token, e = hidden (E), x = expert (X), k = routed slot (K per token),
f = expert width (F).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from engine.model.config import ModelConfig
from engine.model.quant import QuantizedWeight, weight_rows

Params = dict[str, Any]


def route(lp: Params, h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """h [T, E] -> (weights f32 [T, K], expert ids i32 [T, K]).

    Softmax over all X experts, then the top K; with `norm_topk_prob` the K weights are
    rescaled to sum to 1 (for Mixtral that equals a softmax over the top-K logits)."""
    logits = jnp.einsum("te,ex->tx", h, lp["router"], preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # probs: [T, X]
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [T, K] each
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def grouped_experts(
    h: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
    w_up: jax.Array, w_down: jax.Array, first: jax.Array | int = 0,
) -> jax.Array:
    """Sum over each token's experts of weight * expert(h): f32 [T, E].

    h [T, E]; weights/experts [T, K]; w_gate/w_up [Xl, E, F], w_down [Xl, F, E] hold
    experts [first, first + Xl). Assignments to experts outside that range add nothing,
    so per-device partial sums over disjoint ranges add up to the full result."""
    t, k = experts.shape
    w_gate, w_up, w_down = (expert_weights(w, h.dtype) for w in (w_gate, w_up, w_down))
    n_local = w_gate.shape[0]
    local = experts.reshape(-1) - first  # local: [T*K]
    mine = (local >= 0) & (local < n_local)
    # Foreign assignments get key n_local: sorted after every group, so no group holds them.
    key = jnp.where(mine, local, n_local)
    order = jnp.argsort(key, stable=True)  # order: [T*K], assignment index of sorted row i
    sizes = jnp.zeros((n_local,), jnp.int32).at[key].add(1, mode="drop")  # sizes: [Xl]
    rows = h[order // k]  # rows: [T*K, E], grouped by expert
    gate = jax.lax.ragged_dot(rows, w_gate, sizes)  # gate: [T*K, F]
    up = jax.lax.ragged_dot(rows, w_up, sizes)  # up: [T*K, F]
    y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes)  # y: [T*K, E]
    y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)  # back to assignment order
    # Rows past the last group are not defined by ragged_dot: select, do not multiply.
    y = jnp.where(mine[:, None], y.astype(jnp.float32), 0.0).reshape(t, k, -1)  # [T, K, E]
    return jnp.einsum("tke,tk->te", y, jnp.where(mine, weights.reshape(-1), 0.0).reshape(t, k))


def expert_weights(w: jax.Array | QuantizedWeight, dtype: jnp.dtype) -> jax.Array:
    """Stacked experts [X, in, out]: quantized ones (data [X, N, K bytes], a pre-quantized
    checkpoint's) dequantized to `dtype` first, the reference path."""
    if not isinstance(w, QuantizedWeight):
        return w
    nk = weight_rows(w)  # [X, N, K]
    return jnp.swapaxes(nk, -1, -2).astype(dtype)


def moe_ffn(lp: Params, h: jax.Array, cfg: ModelConfig, expert_axis: str | None = None
            ) -> jax.Array:
    """The MoE feed-forward of the normed residual h [T, E] -> [T, E] (h's dtype).

    lp: router [E, X], expert_gate/expert_up [X, E, F], expert_down [X, F, E]."""
    weights, experts = route(lp, h, cfg)
    w = (lp["expert_gate"], lp["expert_up"], lp["expert_down"])
    if expert_axis is None:
        return grouped_experts(h, weights, experts, *w).astype(h.dtype)

    n = jax.sharding.get_abstract_mesh().shape.get(expert_axis)
    if n is None:
        raise ValueError(f"{expert_axis=} is not an axis of the mesh in context (jax.set_mesh)")
    if cfg.num_experts % n:
        raise ValueError(f"{cfg.num_experts=} must be a multiple of the {n} devices of "
                         f"mesh axis {expert_axis!r}")

    def per_device(h, weights, experts, w_gate, w_up, w_down):
        n_local = (w_gate.data if isinstance(w_gate, QuantizedWeight) else w_gate).shape[0]
        first = jax.lax.axis_index(expert_axis) * n_local
        part = grouped_experts(h, weights, experts, w_gate, w_up, w_down, first)
        return jax.lax.psum(part, expert_axis)

    rep, split = PartitionSpec(), PartitionSpec(expert_axis)
    out = jax.shard_map(per_device, in_specs=(rep, rep, rep, split, split, split),
                        out_specs=rep, axis_names={expert_axis})(h, weights, experts, *w)
    return out.astype(h.dtype)
