"""Model configuration for the Llama family, read from an HF `config.json` or GGUF metadata.

One frozen dataclass describes every supported architecture; the differences between
Llama, Mistral, Qwen2, Qwen3, SmolLM2 and the mixture-of-experts Mixtral and Qwen3-MoE are
flags and sizes (`qkv_bias`, `qk_norm`, `num_experts`, ...), not separate model files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


class ConfigError(ValueError):
    """A model configuration the engine cannot run, with a message a user can act on."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    """Architecture family: one of SUPPORTED_ARCHS."""
    vocab_size: int
    hidden_size: int
    """E: the residual stream width."""
    intermediate_size: int
    """F: the MLP width."""
    num_layers: int
    num_heads: int
    """Hq: query heads."""
    num_kv_heads: int
    """Hkv: key/value heads (GQA when < num_heads)."""
    head_dim: int
    """D: per-head width (Qwen3 sets it explicitly; otherwise hidden_size // num_heads)."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """RoPE scaling parameters as sorted (key, value) pairs, e.g. Llama 3.1's `llama3` type."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Qwen2: biases on the q, k and v projections."""
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head of q and k before RoPE."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    """X: routed experts in every layer's MoE block; 0 for a dense MLP in every layer."""
    num_experts_per_tok: int = 0
    """K: experts each token is routed to (top-k of the router)."""
    moe_intermediate_size: int = 0
    """Each expert's MLP width (Mixtral: `intermediate_size`)."""
    norm_topk_prob: bool = True
    """Rescale the top-k router probabilities to sum to 1 (Mixtral: always; Qwen3-MoE: as
    its config says). Probabilities are a softmax over all experts either way."""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.num_heads=} must be a multiple of {self.num_kv_heads=}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling_dict.get("rope_type", "default")
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(f"unsupported rope scaling type {kind!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"{self.num_experts_per_tok=} must be in [1, {self.num_experts=}]"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError(f"{self.moe_intermediate_size=} must be positive for MoE")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, at 2 bytes (bf16) per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """All parameters, every expert counted (not the active parameters per token)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.is_moe:  # router [E, X] and X experts of width moe_intermediate_size
            ffn = e * self.num_experts + 3 * e * self.moe_intermediate_size * self.num_experts
        else:
            ffn = 3 * e * f
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + ffn + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + head + self.num_layers * per_layer + e

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from an HF `config.json` dictionary."""
        model_type = cfg.get("model_type", "")
        arch = model_type if model_type in SUPPORTED_ARCHS else None
        if arch is None:
            archs = cfg.get("architectures") or [model_type]
            raise ConfigError(
                f"unsupported model type {model_type!r} ({archs[0]}); "
                f"supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope, dict):
            rope = dict(rope)
            rope_theta = rope.pop("rope_theta", rope_theta)
            if rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = None
            elif "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
        no_bias = ("llama", "mistral", "qwen3_moe")
        if arch in no_bias and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
            raise ConfigError(f"{model_type} with attention_bias or mlp_bias is not supported")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            **_moe_fields(arch, cfg),
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            return cls.from_hf(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a usable model config ({e!r})") from None


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of ModelConfig from an HF config (none for the dense archs).

    Only the layout with an MoE block in every layer is supported: stacked (lax.scan)
    layers must all have the same parameters."""
    if arch == "mixtral":
        return dict(num_experts=cfg["num_local_experts"],
                    num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    if arch != "qwen3_moe":
        return {}
    # Configs written by transformers name the count num_local_experts; hub ones num_experts.
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
    if num_experts <= 0 or step != 1 or dense:
        raise ConfigError(
            f"qwen3_moe with dense MLP layers ({num_experts=}, decoder_sparse_step={step}, "
            f"mlp_only_layers={dense}) is not supported; only an MoE block in every layer"
        )
    return dict(num_experts=num_experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"],
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))
