"""A loaded checkpoint (config + host weights) and the one entry point that loads any source.

Whatever the source format, tensors come out under HF parameter names in HF layouts, so the
model has a single weight-mapping to maintain:

    model.embed_tokens.weight                      [V, E]
    model.layers.{i}.input_layernorm.weight        [E]
    model.layers.{i}.self_attn.q_proj.weight       [Hq*D, E]   (+ .bias [Hq*D] for qwen2)
    model.layers.{i}.self_attn.k_proj.weight       [Hkv*D, E]  (+ .bias for qwen2)
    model.layers.{i}.self_attn.v_proj.weight       [Hkv*D, E]  (+ .bias for qwen2)
    model.layers.{i}.self_attn.o_proj.weight       [E, Hq*D]
    model.layers.{i}.self_attn.q_norm.weight       [D]         (qwen3)
    model.layers.{i}.self_attn.k_norm.weight       [D]         (qwen3)
    model.layers.{i}.post_attention_layernorm.weight [E]
    model.layers.{i}.mlp.{gate,up}_proj.weight     [F, E]
    model.layers.{i}.mlp.down_proj.weight          [E, F]
    (MoE layers instead: a router and experts, in one of three layouts; see _expert_shapes)
    model.norm.weight                              [E]
    lm_head.weight                                 [V, E]      (absent when tied)

Rotary layout is HF's "rotate half" (GGUF's interleaved llama permutation is undone on load).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from engine.model.config import ModelConfig


class ModelLoadError(Exception):
    """A checkpoint that cannot be loaded; the message is one line: `<file>: <problem>`."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # keep it picklable across processes despite the 2-arg __init__
        return (type(self), (self.path, self.problem))


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    """HF names -> host arrays in HF layouts: float32 from GGUF; safetensors keep their float
    dtype (float32, float16 or ml_dtypes.bfloat16) and are views of the memory-mapped files
    (copy-on-write: writing into one leaves the file as it is)."""
    tokenizer_path: Path | None
    """A folder `transformers.AutoTokenizer.from_pretrained` accepts, or None."""
    path: Path
    """What was loaded: the HF folder or the .gguf file."""
    quantization: str | None = None
    """The QuantizedWeight format of a pre-quantized checkpoint's projections ('int4',
    'fp8', 'int8'; engine.loader.prequant), whose `tensors` then hold those weights as
    QuantizedWeights of in_shape (K,), out_shape (N,); None: every tensor is a float array."""


def _expert_shapes(config: ModelConfig, p: str, names: set[str]) -> dict[str, tuple[int, ...]]:
    """One MoE layer's router and experts, in whichever of the three HF layouts `names` use:
    transformers' fused tensors, Mixtral's block_sparse_moe.experts.{j}.w1/w3/w2, or
    per-expert mlp.experts.{j}.{gate,up,down}_proj (Qwen3-MoE)."""
    x, e, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
    if p + "mlp.experts.gate_up_proj" in names:
        return {p + "mlp.gate.weight": (x, e), p + "mlp.experts.gate_up_proj": (x, 2 * f, e),
                p + "mlp.experts.down_proj": (x, e, f)}
    if p + "block_sparse_moe.gate.weight" in names:
        m, parts = p + "block_sparse_moe.", (("w1", (f, e)), ("w3", (f, e)), ("w2", (e, f)))
    else:
        m, parts = p + "mlp.", (("gate_proj", (f, e)), ("up_proj", (f, e)),
                                ("down_proj", (e, f)))
    shapes = {m + "gate.weight": (x, e)}
    for j in range(x):
        shapes |= {f"{m}experts.{j}.{n}.weight": shape for n, shape in parts}
    return shapes


def expected_shapes(config: ModelConfig, names: set[str] = frozenset()
                    ) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs, with its HF shape (see the module docstring).
    `names`: the checkpoint's tensor names, which pick the layout of MoE experts."""
    e, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, e),
        "model.norm.weight": (e,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (e,),
            p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (q, e),
            p + "self_attn.k_proj.weight": (kv, e),
            p + "self_attn.v_proj.weight": (kv, e),
            p + "self_attn.o_proj.weight": (e, q),
        }
        if config.is_moe:
            shapes |= _expert_shapes(config, p, names)
        else:
            shapes |= {p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                       p + "mlp.down_proj.weight": (e, f)}
        if config.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def check_tensors(path: Path, config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Raise ModelLoadError unless `tensors` holds exactly the parameters `config` needs."""
    want = expected_shapes(config, set(tensors))
    missing = [n for n in want if n not in tensors]
    extra = [n for n in tensors if n not in want]
    for kind, names in (("missing", missing), ("unexpected", extra)):
        if names:
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            raise ModelLoadError(path, f"{kind} tensors {', '.join(names[:3])}{more}")
    for name, shape in want.items():
        t = tensors[name]  # a QuantizedWeight stands for its HF [N, K] weight
        got = (t.n, t.k) if hasattr(t, "in_shape") else tuple(t.shape)
        if got != shape:
            raise ModelLoadError(path, f"{name} has shape {got}, the config implies {shape}")
