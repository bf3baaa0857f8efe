"""Logical axis names of every parameter: the model names its axes, it does not know the mesh.

`engine.parallel` maps these names to mesh axes with rules from the config (for example
heads -> "tp"), so one model definition runs unsharded, tensor-parallel or expert-parallel.

Names: vocab, embed (E), heads (Hq), kv_heads (Hkv), head_dim (D), mlp (F), expert (X),
expert_mlp (the MoE expert width). A stacked (lax.scan) layer tree gains a leading `layers`.
"""

from __future__ import annotations

from typing import Any

Axes = tuple[str | None, ...]

PARAM_AXES: dict[str, Axes] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("embed",),
    # per layer
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "bq": ("heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    # q/k/v fused (engine.model.weights.fuse_qkv): per KV head, its query heads, K, then V
    "wqkv": ("embed", "kv_heads", None, "head_dim"),
    "bqkv": ("kv_heads", None, "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    # gate/up fused (engine.model.weights.fuse_gate_up): per MLP channel, gate then up
    "w_gate_up": ("embed", "mlp", None),
    # per layer, MoE (the router's expert axis stays whole: every device routes every token)
    "router": ("embed", None),
    "expert_gate": ("expert", "embed", "expert_mlp"),
    "expert_up": ("expert", "embed", "expert_mlp"),
    "expert_down": ("expert", "expert_mlp", "embed"),
}
"""Parameter name -> the logical name of each of its axes."""


def param_axes(params: Any) -> Any:
    """A pytree like `params` whose leaves are the Axes of each parameter."""
    def layer_axes(lp: dict[str, Any], stacked: bool) -> dict[str, Axes]:
        lead: Axes = ("layers",) if stacked else ()
        return {name: lead + PARAM_AXES[name] for name in lp}

    out: dict[str, Any] = {k: PARAM_AXES[k] for k in params if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, dict):
        out["layers"] = layer_axes(layers, stacked=True)
    else:
        out["layers"] = [layer_axes(lp, stacked=False) for lp in layers]
    return out
