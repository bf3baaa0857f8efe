"""The EAGLE-3 draft head: its published checkpoint layout, loading, and forward pass (JAX).

An EAGLE-3 head (Li et al., 2025; the layout SGLang, vLLM and SpecForge read) is one Llama
decoder layer that drafts from the target's own features:

- `fc` [E, C * Et] maps the concatenation of the target's residual stream entering C = 3 of
  its layers (by default layers 2, L // 2 and L - 3 of L, i.e. the outputs of layers 1,
  L // 2 - 1 and L - 4; a checkpoint may name others under eagle_config's
  `eagle_aux_hidden_state_layer_ids`) to the head's width E;
- the layer's attention reads [input_layernorm(embedding) ; hidden_norm(hidden)], 2E wide
  (q/k/v_proj [*, 2E]); the residual is the hidden state itself, then the usual MLP block;
- `norm` then `lm_head` [Vd, E] give logits over a reduced draft vocabulary; `d2t` [Vd] maps
  draft id i to target id i + d2t[i];
- the embedding is the target's (checkpoints that carry their own copy are read without it).

Row p of a request drafts from its token p + 1 and the target's features at position p (or,
chaining, the head's own pre-norm output at p, which is fed back instead of fc(features)).
Its K/V is a 1-layer paged cache of its own.

Einsum letters: t = token, e = head width (E), i = attention input (2E), h = query head,
k = kv head, d = head dim, f = MLP width, v = draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from engine.attention import AttentionMetadata
from engine.loader.hf import _read_safetensors
from engine.model.config import ConfigError, ModelConfig
from engine.model.llama import Attend, WriteKV, apply_rope, rms_norm, rope_inv_freq
from engine.model.quant import embed_rows


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    head: ModelConfig
    """The head's decoder layer as a 1-layer Llama (its KV cache, RoPE and sizes); its
    vocab_size is the target's."""
    draft_vocab_size: int
    """Vd: rows of lm_head (d2t maps them to target ids)."""
    target_hidden_size: int
    """Et: the target's width (fc reads C * Et)."""
    aux_layers: tuple[int, ...]
    """The target layers whose inputs fc reads, in order."""


def aux_layers_for(num_layers: int) -> tuple[int, ...]:
    """The published default: the inputs of layers 2, L // 2 and L - 3 (SGLang's and vLLM's
    choice for Llama targets, and what SpecForge trains on)."""
    return (2, num_layers // 2, num_layers - 3)


def read_eagle_config(path: str | Path, target: ModelConfig) -> EagleConfig:
    """config.json of an EAGLE-3 folder, checked against the target; a clear ConfigError for
    a folder that is not an EAGLE-3 head or whose sizes do not fit the target."""
    folder = Path(path)
    file = folder / "config.json" if folder.is_dir() else folder
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: unreadable EAGLE-3 config ({e})") from None
    archs = raw.get("architectures") or []
    if not isinstance(raw, dict) or not any("eagle3" in str(a).lower() for a in archs):
        raise ConfigError(f"{file}: not an EAGLE-3 head (architectures {archs!r}; expected "
                          f"one like LlamaForCausalLMEagle3). A whole draft model goes with "
                          f"--speculative-algorithm draft")
    try:
        head = ModelConfig.from_hf({**raw, "model_type": "llama",
                                    "vocab_size": raw.get("vocab_size", target.vocab_size),
                                    "tie_word_embeddings": False})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{file}: not a usable EAGLE-3 config ({e!r})") from None
    if head.num_layers != 1:
        raise ConfigError(f"{file}: an EAGLE-3 head has one layer, got {head.num_layers}")
    et = int(raw.get("target_hidden_size") or head.hidden_size)
    if et != target.hidden_size or head.vocab_size != target.vocab_size:
        raise ConfigError(f"{file}: the head is for a target of width {et} and vocabulary "
                          f"{head.vocab_size}, the model has {target.hidden_size} and "
                          f"{target.vocab_size}: a head trained for another model")
    ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(int(i) for i in ids) if ids else aux_layers_for(target.num_layers)
    if not all(0 <= i < target.num_layers for i in layers):
        raise ConfigError(f"{file}: aux layers {layers} outside the target's "
                          f"{target.num_layers} layers")
    vd = int(raw.get("draft_vocab_size") or head.vocab_size)
    return EagleConfig(head, vd, et, layers)


def head_config_like(target: dict[str, Any], draft_vocab_size: int = 32000) -> dict[str, Any]:
    """An EAGLE-3 config.json for a target's HF config (the published heads' choice: the
    target's layer sizes and RoPE, a reduced draft vocabulary); for random heads
    (--load-format dummy) of the right shapes."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
            "vocab_size")
    return {**{k: target[k] for k in keys if k in target},
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "num_hidden_layers": 1, "target_hidden_size": target["hidden_size"],
            "draft_vocab_size": min(draft_vocab_size, target["vocab_size"])}


def _check(name: str, got: tuple[int, ...], want: tuple[int, ...], where: Path) -> None:
    if got != want:
        raise ConfigError(f"{where}: tensor {name} has shape {got}, the config says {want}")


def load_eagle_params(path: str | Path, ec: EagleConfig, dtype: jnp.dtype) -> dict[str, Any]:
    """The head's weights from the folder's *.safetensors (published names), in our
    layouts. The embedding is not among them (the target's is used)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors in the EAGLE-3 folder (or use "
                          f"--load-format dummy for a random head)")
    t: dict[str, np.ndarray] = {}
    with tqdm(desc=f"Loading {folder.name}", unit="tensor", disable=True) as bar:
        for f in files:
            _read_safetensors(f, t, bar)  # bfloat16 read as raw bytes
    c = ec.head
    e, hq, hk, d, ff = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "fc.weight": (e, len(ec.aux_layers) * ec.target_hidden_size),
        "midlayer.input_layernorm.weight": (e,), "midlayer.hidden_norm.weight": (e,),
        "midlayer.post_attention_layernorm.weight": (e,), "norm.weight": (e,),
        "midlayer.self_attn.q_proj.weight": (hq * d, 2 * e),
        "midlayer.self_attn.k_proj.weight": (hk * d, 2 * e),
        "midlayer.self_attn.v_proj.weight": (hk * d, 2 * e),
        "midlayer.self_attn.o_proj.weight": (e, hq * d),
        "midlayer.mlp.gate_proj.weight": (ff, e), "midlayer.mlp.up_proj.weight": (ff, e),
        "midlayer.mlp.down_proj.weight": (e, ff), "lm_head.weight": (ec.draft_vocab_size, e),
    }
    for name, shape in shapes.items():
        if name not in t:
            raise ConfigError(f"{folder}: tensor {name} missing: not an EAGLE-3 checkpoint")
        _check(name, tuple(t[name].shape), shape, folder)
    d2t = t.get("d2t")
    if d2t is None and ec.draft_vocab_size != c.vocab_size:
        raise ConfigError(f"{folder}: a reduced draft vocabulary ({ec.draft_vocab_size}) "
                          f"needs the d2t tensor")
    if d2t is not None:
        _check("d2t", tuple(d2t.shape), (ec.draft_vocab_size,), folder)

    def w(name: str) -> np.ndarray:
        return t[name].astype(np.float32)

    p = "midlayer."
    params = {
        "fc": w("fc.weight").T,  # [C * Et, E]
        "input_norm": w(p + "input_layernorm.weight"),
        "hidden_norm": w(p + "hidden_norm.weight"),
        "wq": w(p + "self_attn.q_proj.weight").T.reshape(2 * e, hq, d),
        "wk": w(p + "self_attn.k_proj.weight").T.reshape(2 * e, hk, d),
        "wv": w(p + "self_attn.v_proj.weight").T.reshape(2 * e, hk, d),
        "wo": w(p + "self_attn.o_proj.weight").T.reshape(hq, d, e),
        "post_norm": w(p + "post_attention_layernorm.weight"),
        "w_gate": w(p + "mlp.gate_proj.weight").T, "w_up": w(p + "mlp.up_proj.weight").T,
        "w_down": w(p + "mlp.down_proj.weight").T,
        "norm": w("norm.weight"), "lm_head": w("lm_head.weight").T,  # [E, Vd]
    }
    out = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    out["d2t"] = jnp.asarray(d2t if d2t is not None else np.zeros(ec.draft_vocab_size),
                             jnp.int32)
    return out


def random_eagle_params(ec: EagleConfig, dtype: jnp.dtype, seed: int = 0) -> dict[str, Any]:
    """A random head of the config's sizes (--load-format dummy: the overhead floor; it
    proposes noise), with a d2t that spreads the draft vocabulary over the target's."""
    c = ec.head
    e, hq, hk, d, ff = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {"fc": (len(ec.aux_layers) * ec.target_hidden_size, e),
              "wq": (2 * e, hq, d), "wk": (2 * e, hk, d), "wv": (2 * e, hk, d),
              "wo": (hq, d, e), "w_gate": (e, ff), "w_up": (e, ff), "w_down": (ff, e),
              "lm_head": (e, ec.draft_vocab_size)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = {n: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype)
           for k, (n, s) in zip(keys, shapes.items(), strict=True)}
    for n in ("input_norm", "hidden_norm", "post_norm", "norm"):
        out[n] = jnp.ones(e, dtype)
    vd = ec.draft_vocab_size
    out["d2t"] = jnp.asarray(np.arange(vd) * (c.vocab_size // vd) - np.arange(vd), jnp.int32)
    return out


def head_forward(
    params: dict[str, Any], embed: Any, kv: tuple[jax.Array, jax.Array], tokens: jax.Array,
    hidden: jax.Array, md: AttentionMetadata, logits_idx: jax.Array, *, cfg: ModelConfig,
    attend: Attend, write: WriteKV,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """tokens [T], hidden [T, E] (fc(features) or a fed-back output) -> (greedy target token
    ids [S] at rows logits_idx, the pre-norm outputs [S, E] there, the updated K/V)."""
    eps = cfg.rms_norm_eps
    emb = embed_rows(embed, tokens, hidden.dtype)  # [T, E]
    a = jnp.concatenate([rms_norm(emb, params["input_norm"], eps),
                         rms_norm(hidden, params["hidden_norm"], eps)], axis=-1)  # [T, 2E]
    q = jnp.einsum("ti,ihd->thd", a, params["wq"])  # [T, Hq, D]
    k = jnp.einsum("ti,ikd->tkd", a, params["wk"])  # [T, Hkv, D]
    v = jnp.einsum("ti,ikd->tkd", a, params["wv"])
    inv = rope_inv_freq(cfg)
    q, k = apply_rope(q, md.positions, inv), apply_rope(k, md.positions, inv)
    k_cache, v_cache = write(kv[0], kv[1], k, v, md.slot_mapping, None)
    o = attend(q, k_cache, v_cache, md, layer=None)  # [T, Hq, D]
    x = hidden + jnp.einsum("thd,hde->te", o, params["wo"])  # [T, E]
    h = rms_norm(x, params["post_norm"], eps)
    gate = jnp.einsum("te,ef->tf", h, params["w_gate"])
    up = jnp.einsum("te,ef->tf", h, params["w_up"])
    x = x + jnp.einsum("tf,fe->te", jax.nn.silu(gate) * up, params["w_down"])
    out = x[logits_idx]  # [S, E], fed back when chaining
    logits = jnp.einsum("se,ev->sv", rms_norm(out, params["norm"], eps), params["lm_head"],
                        preferred_element_type=jnp.float32)  # [S, Vd]
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return best + params["d2t"][best], out, (k_cache, v_cache)
