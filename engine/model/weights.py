"""From HF-named checkpoint tensors to the model's parameter pytree, and random weights.

Layouts (the model's einsums read these):
  embed [V, E]; lm_head [E, V] (absent when tied); norm [E]
  per layer: attn_norm [E], wq [E, Hq, D], wk/wv [E, Hkv, D], wo [Hq, D, E],
             bq [Hq, D], bk/bv [Hkv, D] (Qwen2), q_norm/k_norm [D] (Qwen3),
             mlp_norm [E], w_gate/w_up [E, F], w_down [F, E]
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from engine.model.config import ModelConfig
from engine.model.llama import Params


def _layer_from_hf(t: Mapping[str, np.ndarray], i: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    e, d, hq, hk = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    lp = {
        "attn_norm": t[p + "input_layernorm.weight"],
        "wq": t[a + "q_proj.weight"].T.reshape(e, hq, d),
        "wk": t[a + "k_proj.weight"].T.reshape(e, hk, d),
        "wv": t[a + "v_proj.weight"].T.reshape(e, hk, d),
        "wo": t[a + "o_proj.weight"].T.reshape(hq, d, e),
        "mlp_norm": t[p + "post_attention_layernorm.weight"],
        "w_gate": t[m + "gate_proj.weight"].T,
        "w_up": t[m + "up_proj.weight"].T,
        "w_down": t[m + "down_proj.weight"].T,
    }
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


def params_from_hf(
    tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: jnp.dtype, *, scan: bool
) -> Params:
    """Convert HF-named tensors; weights are cast to `dtype` as they move to the device."""
    put = lambda x: jnp.asarray(np.ascontiguousarray(x), dtype=dtype)
    layers = [jax.tree.map(put, _layer_from_hf(tensors, i, cfg)) for i in range(cfg.num_layers)]
    params: Params = {
        "embed": put(tensors["model.embed_tokens.weight"]),
        "norm": put(tensors["model.norm.weight"]),
        "layers": stack_layers(layers) if scan else layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = put(tensors["lm_head.weight"].T)
    return params


def random_params(cfg: ModelConfig, dtype: jnp.dtype, *, scan: bool, seed: int = 0) -> Params:
    """Random weights made on the device (`--load-format dummy`): no checkpoint needed."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hk, v = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    shapes = {"wq": (e, hq, d), "wk": (e, hk, d), "wv": (e, hk, d), "wo": (hq, d, e),
              "w_gate": (e, f), "w_up": (e, f), "w_down": (f, e)}
    if cfg.qkv_bias:
        shapes.update(bq=(hq, d), bk=(hk, d), bv=(hk, d))
    key = jax.random.key(seed)

    @jax.jit
    def make_layer(k):
        keys = jax.random.split(k, len(shapes))
        lp = {n: (0.02 * jax.random.normal(kk, s)).astype(dtype)
              for (n, s), kk in zip(shapes.items(), keys, strict=True)}
        ones = {"attn_norm": e, "mlp_norm": e}
        if cfg.qk_norm:
            ones.update(q_norm=d, k_norm=d)
        lp.update({n: jnp.ones((s,), dtype) for n, s in ones.items()})
        return lp

    keys = jax.random.split(key, cfg.num_layers + 2)
    layers = [make_layer(keys[i]) for i in range(cfg.num_layers)]
    params: Params = {
        "embed": (0.02 * jax.random.normal(keys[-1], (v, e))).astype(dtype),
        "norm": jnp.ones((e,), dtype),
        "layers": stack_layers(layers) if scan else layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = (0.02 * jax.random.normal(keys[-2], (e, v))).astype(dtype)
    return params
