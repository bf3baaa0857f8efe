"""Tiny random HF models (torch) and a direct driver of our model, for logit comparisons."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from backends.cpu.attention import ragged_paged_attention
from backends.cpu.backend import CpuBackend
from engine.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.llama import forward
from engine.model.weights import params_from_hf

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

TINY_CONFIGS = {
    "llama3": transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=None),
}


def make_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[name])
    # Random init leaves norms at 1 and biases at 0; perturb them so they are tested.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval().float()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def tensors_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def our_logits(cfg: ModelConfig, params, ids: list[int], *, page_size: int = 4,
               chunks: list[int] | None = None, kv_dtype=jnp.float32) -> np.ndarray:
    """Run `ids` as one sequence through our model (optionally in prompt chunks) and
    return the logits of every position [len(ids), V]."""
    backend = CpuBackend()
    n = len(ids)
    num_pages = -(-n // page_size) + 1
    scan = isinstance(params["layers"], dict)
    kv = backend.allocate_kv(cfg, num_pages, page_size, kv_dtype, scan=scan)
    pages = np.arange(num_pages, dtype=np.int32)[None, :]
    attend = functools.partial(ragged_paged_attention, scale=cfg.head_dim**-0.5)
    fwd = jax.jit(functools.partial(forward, cfg=cfg, attend=attend))
    out, start = [], 0
    for c in chunks or [n]:
        md = AttentionMetadata.one_sequence(start, c, pages, page_size, num_pages)
        tok = np.zeros(md.positions.shape[0], np.int32)
        tok[:c] = ids[start:start + c]
        logits, kv = fwd(params, kv, tok, md, np.arange(c, dtype=np.int32))
        out.append(np.asarray(logits))
        start += c
    return np.concatenate(out)


def load_ours(model, *, scan: bool):
    cfg = ModelConfig.from_hf(model.config.to_dict())
    return cfg, params_from_hf(tensors_of(model), cfg, jnp.float32, scan=scan)
