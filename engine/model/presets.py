"""Known model shapes for `--load-format dummy` (random weights, no checkpoint needed)."""

from __future__ import annotations

from engine.model.config import ModelConfig

_LLAMA31 = dict(
    model_type="llama", vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)

PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64),
    "llama-3.2-1b": dict(_LLAMA31, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA31["rope_scaling"], factor=32.0)),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # Mixture of experts: every expert counted in the weights, K of X active per token.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, rope_theta=1000000.0,
                          max_position_embeddings=40960, rms_norm_eps=1e-6,
                          bos_token_id=151643, eos_token_id=151645),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         rope_theta=1000000.0, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}


def preset_config(name: str) -> ModelConfig | None:
    hf = PRESETS.get(name.lower())
    return ModelConfig.from_hf(hf) if hf else None
