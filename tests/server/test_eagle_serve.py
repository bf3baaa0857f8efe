"""`engine serve --speculative-algorithm eagle3` with an EAGLE-3 head in the published layout
(random, written here, for the default model's sizes): one greedy stream equals the engine's
output without speculation, and /metrics counts the head's drafts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import SamplingParams
from tests.server.conftest import MODEL, SMALL, metrics, running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

PROMPT = "Repeat the following text exactly.\nText: The quick brown fox jumps over the lazy dog."


def random_head(folder: Path, cfg, draft_vocab: int = 512) -> Path:
    """A random EAGLE-3 head for a target of ModelConfig `cfg`, published tensor names."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, kv, v = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": e, "intermediate_size": f,
        "num_hidden_layers": 1, "num_attention_heads": h, "num_key_value_heads": kv,
        "head_dim": d, "vocab_size": v, "draft_vocab_size": draft_vocab,
        "target_hidden_size": e, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": 8192}))
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    p = "midlayer."
    save_file({"fc.weight": r(e, 3 * e), p + "input_layernorm.weight": np.ones(e, np.float32),
               p + "hidden_norm.weight": np.ones(e, np.float32),
               p + "post_attention_layernorm.weight": np.ones(e, np.float32),
               "norm.weight": np.ones(e, np.float32),
               p + "self_attn.q_proj.weight": r(h * d, 2 * e),
               p + "self_attn.k_proj.weight": r(kv * d, 2 * e),
               p + "self_attn.v_proj.weight": r(kv * d, 2 * e),
               p + "self_attn.o_proj.weight": r(e, h * d), p + "mlp.gate_proj.weight": r(f, e),
               p + "mlp.up_proj.weight": r(f, e), p + "mlp.down_proj.weight": r(e, f),
               "lm_head.weight": r(draft_vocab, e),
               "d2t": (np.arange(draft_vocab) * (v // draft_vocab)).astype(np.int64)
               - np.arange(draft_vocab)}, str(folder / "model.safetensors"))
    return folder


def test_greedy_stream_equals_the_output_without_speculation(tmp_path: Path, default_llm
                                                             ) -> None:
    want = default_llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0.0))[0]
    head = random_head(tmp_path / "head", default_llm.model_config)
    args = [*SMALL, "--speculative-algorithm", "eagle3", "--speculative-draft-model", str(head),
            "--no-speculative-adaptive"]
    with running_server(tmp_path, args, name="eagle") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                               timeout=300)
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                                temperature=0.0, stream=True))
        counts = metrics(httpx.Client(base_url=server.url, timeout=60))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.outputs[0].text and len(want.outputs[0].token_ids) > 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        want.outputs[0].finish_reason]
    assert counts["engine:spec_decode_num_draft_tokens_total"] >= 20  # it did speculate
