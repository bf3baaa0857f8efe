"""The whole model through the NPU backend's torch executor (CPU torch, reference ops)
equals the JAX model on the CPU backend: logits within 1e-4 (float32) and the same greedy
tokens, on the tiny HF configs (dense and MoE) and on SmolLM2 (the real GGUF) end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.cpu.backend import CpuBackend
from backends.npu.backend import NpuBackend
from backends.npu.executor import TorchJit
from backends.npu.runner import params_to_torch
from engine.attention import AttentionMetadata
from engine.model.weights import fuse_qkv
from engine.runner import model_forward
from engine.sampling_params import SamplingParams
from tests.models.hf_reference import load_ours, make_hf_model
from tests.models.moe_reference import make_moe_model

IDS = [3, 17, 99, 254, 8, 8, 42, 1, 0, 77, 130, 5, 61, 200, 19]
PAGE = 4


def run_chunks(fwd, params, kv, chunks: list[int], num_pages: int) -> list[np.ndarray]:
    """IDS in prompt chunks (each over the cached prefix; mid-page starts with PAGE 4),
    then two greedy decode steps. Returns each step's logits [n, V] (float32)."""
    pages = np.arange(num_pages, dtype=np.int32)[None, :]
    out, start, ids = [], 0, list(IDS)
    for c in [*chunks, 1, 1]:
        md = AttentionMetadata.one_sequence(start, c, pages, PAGE, num_pages)
        tok = np.zeros(md.positions.shape[0], np.int32)
        tok[:c] = ids[start:start + c]
        rows = np.arange(16, dtype=np.int32) % c  # one shape for every step: fewer programs
        logits, kv = fwd(params, kv, tok, md, rows)
        logits = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        logits = logits[:c]
        out.append(logits)
        start += c
        if start == len(ids):  # greedy decode: the next token is this step's argmax
            ids.append(int(logits[-1].argmax()))
    return out


MODELS = {"llama3": make_hf_model, "qwen2": make_hf_model, "qwen3": make_hf_model,
          "mistral": make_hf_model, "mixtral": make_moe_model}


@pytest.mark.parametrize("name,scan", [*((n, False) for n in MODELS), ("qwen3", True)])
def test_tiny_models_equal_jax(name, scan):
    cfg, params = load_ours(MODELS[name](name), scan=scan)
    params = fuse_qkv(params)
    num_pages = -(-(len(IDS) + 2) // PAGE) + 1
    cpu, npu = CpuBackend(), NpuBackend({"npu_device": "cpu"})
    want = run_chunks(jax.jit(model_forward(cfg, cpu)), params,
                      cpu.allocate_kv(cfg, num_pages, PAGE, jnp.float32, scan=scan),
                      [6, 7, 2], num_pages)
    kv = jax.tree.map(lambda a: torch.from_numpy(np.array(a)),
                      npu.allocate_kv(cfg, num_pages, PAGE, jnp.float32, scan=scan))
    got = run_chunks(TorchJit(model_forward(cfg, npu), npu.ops, "cpu"),
                     params_to_torch(params, torch.device("cpu")), kv, [6, 7, 2], num_pages)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))


def test_smollm2_tokens_equal_cpu_backend(float32_llm):
    """The default model end to end (scheduler, buckets, sampler): greedy and seeded
    sampled rows in one batch, with logprobs, give the CPU backend's tokens (float32 weights:
    the NPU runs the GGUF dequantized)."""
    from engine import LLM

    llm = LLM(backend="npu", npu_device="cpu", max_total_tokens=2048, max_running_requests=4,
              chunked_prefill_size=64)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    params = [SamplingParams(max_tokens=6, temperature=0.0),
              SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=40, seed=7,
                             logprobs=2),
              SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)]
    ours = llm.generate(prompts, params)
    ref = float32_llm.generate(prompts, params)
    for o, r in zip(ours, ref, strict=True):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        lp, ref_lp = o.outputs[0].logprobs, r.outputs[0].logprobs
        assert (lp is None) == (ref_lp is None)
        for step, ref_step in zip(lp or [], ref_lp or [], strict=True):
            assert step.keys() == ref_step.keys()
            np.testing.assert_allclose([step[t] for t in step], [ref_step[t] for t in step],
                                       atol=1e-4)
    # a grammar-constrained row: the split step (forward, then the masked sample)
    regex = SamplingParams(max_tokens=4, temperature=0.0, regex="[0-9]{3}")
    ours = llm.generate("My favourite number is", regex)[0].outputs[0]
    assert ours.token_ids == float32_llm.generate("My favourite number is",
                                                  regex)[0].outputs[0].token_ids
    assert len(ours.text) == 3 and ours.text.isdigit()
