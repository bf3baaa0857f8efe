"""Tiny random HF mixture-of-experts models (torch) for logit comparisons with ours.

HF's random init gives a near-uniform router and experts whose output is small next to the
residual; both are scaled up here so that which experts are chosen, and how their outputs
are weighted, moves the logits well beyond the test tolerance."""

from __future__ import annotations

import torch
import transformers

TINY_MOE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)

MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **TINY_MOE, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **TINY_MOE, head_dim=32, intermediate_size=128, moe_intermediate_size=48,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    "qwen3_moe_norm": lambda: transformers.Qwen3MoeConfig(
        **TINY_MOE, head_dim=32, intermediate_size=128, moe_intermediate_size=48,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
}


def make_moe_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(MOE_CONFIGS[name]())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith("mlp.gate.weight"):  # router [X, E]: decisive, not uniform
                p.copy_(0.3 * torch.randn_like(p))
            elif ".experts." in n:
                p.mul_(5.0)
    return model.eval().float()
