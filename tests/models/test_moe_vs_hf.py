"""Mixture-of-experts models (Mixtral, Qwen3-MoE) vs HF transformers (torch, float32, same
weights), their configs, and the whole engine on an MoE model with random weights."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from engine import LLM, SamplingParams
from engine.loader.checkpoint import ModelLoadError, check_tensors
from engine.loader.load import load_checkpoint
from engine.model.config import ConfigError, ModelConfig
from engine.model.weights import params_from_hf
from tests.models.hf_reference import (
    TINY_CONFIGS,
    hf_logits,
    load_ours,
    make_hf_model,
    our_logits,
)
from tests.models.moe_reference import MOE_CONFIGS, make_moe_model

IDS = [3, 17, 99, 254, 8, 8, 42, 1, 0, 77, 130, 5, 61, 200, 19, 23, 7, 88, 150, 31, 2]


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_hf(name, scan):
    model = make_moe_model(name)
    cfg, params = load_ours(model, scan=scan)
    assert cfg.num_experts == 8 and cfg.norm_topk_prob == (name != "qwen3_moe")
    np.testing.assert_allclose(our_logits(cfg, params, IDS), hf_logits(model, IDS),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_routing_variant_is_detected(name):
    """The tolerance above is tight enough to tell the top-k normalization apart."""
    model = make_moe_model(name)
    cfg, params = load_ours(model, scan=True)
    flipped = dataclasses.replace(cfg, norm_topk_prob=not cfg.norm_topk_prob)
    assert np.abs(our_logits(flipped, params, IDS) - hf_logits(model, IDS)).max() > 1e-2


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_greedy_tokens_match_hf_through_decode(name):
    """HF's greedy continuation is our argmax at every step, with the prompt prefilled in
    one chunk and each generated token decoded one at a time against the paged KV cache."""
    model = make_moe_model(name, seed=1)
    prompt, n = IDS[9:18], 10  # no token 0: generate() would take it for padding
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = out[0].tolist()
    cfg, params = load_ours(model, scan=True)
    ours = our_logits(cfg, params, seq, chunks=[len(prompt)] + [1] * n)
    assert ours[len(prompt) - 1:-1].argmax(-1).tolist() == seq[len(prompt):]


@pytest.mark.parametrize("name,marker", [("mixtral", ".block_sparse_moe.experts.0.w1."),
                                         ("qwen3_moe_norm", ".mlp.experts.0.gate_proj.")])
def test_per_expert_checkpoint_names(tmp_path, name, marker):
    """save_pretrained writes the hub's per-expert names (transformers' state_dict holds the
    experts fused); both load to the same model."""
    model = make_moe_model(name, seed=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    assert any(marker in k for k in tensors) and not any("gate_up_proj" in k for k in tensors)
    ckpt = load_checkpoint(tmp_path, progress=False)  # checks every name and shape
    params = params_from_hf(ckpt.tensors, ckpt.config, jnp.float32, scan=False)
    np.testing.assert_allclose(our_logits(ckpt.config, params, IDS), hf_logits(model, IDS),
                               atol=2e-5, rtol=1e-4)
    # transformers' own state_dict holds the experts fused: that layout passes the check too.
    fused = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any("gate_up_proj" in k for k in fused)
    check_tensors(tmp_path, ckpt.config, fused)
    del fused[next(k for k in fused if "experts.down_proj" in k)]
    with pytest.raises(ModelLoadError, match="missing tensors .*experts.down_proj"):
        check_tensors(tmp_path, ckpt.config, fused)


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS) + sorted(TINY_CONFIGS))
def test_num_params_counts_every_parameter(name):
    """Every expert, and the Qwen2 biases and Qwen3 q/k norms of the dense models."""
    model = make_moe_model(name) if name in MOE_CONFIGS else make_hf_model(name)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32,
                 moe_intermediate_size=8, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2)


def test_qwen3_moe_hub_config_names_num_experts():
    cfg = ModelConfig.from_hf(QWEN3_MOE)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 8)
    assert cfg.qk_norm and not cfg.norm_topk_prob


@pytest.mark.parametrize("change,words", [
    (dict(mlp_only_layers=[0]), "mlp_only_layers=[0]"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
])
def test_unsupported_moe_layouts_are_refused(change, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_hf({**QWEN3_MOE, **change})


@pytest.mark.parametrize("scan", [True, False])
def test_engine_generates_with_random_moe_weights(tmp_path, scan):
    """The whole engine (scheduler, mixed ragged batches, paged KV, sampler) on a dummy
    Qwen3-MoE: each request's greedy tokens are the direct model's argmax."""
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_MOE, "num_hidden_layers": 2}))
    llm = LLM(str(tmp_path / "config.json"), backend="cpu", dtype="float32",
              load_format="dummy", scan_layers=scan, page_size=4, chunked_prefill_size=16,
              max_running_requests=4, max_total_tokens=256)
    prompts = [[5, 9, 60, 31, 7], [17] * 3 + [33, 34, 35, 36, 50, 4, 4, 8], [42]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0,
                                                ignore_eos=True))
    params = llm.engine.runner.params
    assert isinstance(params["layers"], dict) == scan
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == 8
        seq = prompt + out.token_ids
        logits = our_logits(llm.model_config, params, seq)
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out.token_ids
