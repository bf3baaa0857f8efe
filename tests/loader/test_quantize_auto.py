"""Quantization 'auto': a GGUF file keeps its blocks (gguf), any other checkpoint gets the
CPU kernels' float32 layout (f32), and an explicit method is left alone."""

from __future__ import annotations

from pathlib import Path

from engine import LLM
from engine.loader.quantize import resolve_auto
from engine.sampling_params import SamplingParams
from tests.models.test_loader import tiny_hf_model


def test_resolve_auto():
    assert resolve_auto("auto", Path("m/SmolLM2.Q4_1.gguf")) == "gguf"
    assert resolve_auto("auto", Path("m/hf-folder")) == "f32"
    assert resolve_auto("auto", Path("m/config.json")) == "f32"  # --load-format dummy
    assert resolve_auto("auto", None) == "f32"
    # under a mesh a GGUF block of 32 along K need not fit a shard: float weights
    assert resolve_auto("auto", Path("m/SmolLM2.Q4_1.gguf"), sharded=True) == "f32"
    for method in (None, "int8", "gguf", "f32", "fp8", "int4"):
        assert resolve_auto(method, Path("m.gguf")) == method


def test_auto_gives_safetensors_the_f32_layout(tmp_path):
    """(The default GGUF through auto kept its q4_1 blocks and answered Paris when checked
    on 2026-12-04; that load costs 10 s, so the mapping is checked by test_resolve_auto.)"""
    tiny_hf_model("llama").save_pretrained(tmp_path)
    small = dict(backend="cpu", max_total_tokens=256, max_running_requests=2,
                 quantization="auto")
    hf = LLM(str(tmp_path), **small)
    assert hf.engine.runner.params["layers"][0]["wqkv"].fmt == "f32"
    out = hf.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0,
                                                ignore_eos=True))
    assert len(out[0].token_ids) == 3
