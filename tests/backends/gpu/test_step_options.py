"""The XLA options the GPU backends' step programs compile with: with fp8 weights XLA's
Triton GEMMs are off (cuBLASLt's FP8 matmul, no autotuning of Triton configurations for
each prompt-sized FP8 dot: minutes of start-up on an H200, backends/gpu/backend.py); with
any other weights XLA's defaults. The builder sets them from the loaded weights
(Backend.options_for); every program over the weights is made by Backend.jit. The whole
engine's case: tests/backends/rocm/test_rocm_fp8.py (both GPU backends, fp8 weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import engine.backend
from backends.cuda.backend import CudaBackend
from backends.rocm.backend import RocmBackend
from engine.model.config import ModelConfig
from engine.model.quant import pack
from engine.runner import make_step

NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def weights(fmt: str | None) -> dict:
    w = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    return {"embed": w, "layers": [{"wo": pack(w, 1, fmt) if fmt else w}]}


@pytest.mark.parametrize("cls", [CudaBackend, RocmBackend])
@pytest.mark.parametrize("fmt, options", [("fp8", NO_TRITON_GEMM), ("int8", {}),
                                          ("int4", {}), (None, {})])
def test_fp8_weights_turn_xla_triton_gemms_off(cls, fmt, options):
    be = cls({"interpret": True})
    assert be.options_for(be.prepare_weights(weights(fmt))) == options
    assert be.compiler_options == {}  # asking sets nothing: the builder does


def test_step_programs_take_the_backends_options(monkeypatch):
    made = []
    real = jax.jit
    monkeypatch.setattr(engine.backend.jax, "jit",
                        lambda fn, **kw: made.append(kw) or real(fn, **kw))
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                               "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1})
    be = CudaBackend({"interpret": True})
    make_step(cfg, be, 16)
    assert made[-1]["compiler_options"] is None  # XLA's defaults
    be.compiler_options = be.options_for(weights("fp8"))
    make_step(cfg, be, 16)
    assert made[-1]["compiler_options"] == NO_TRITON_GEMM
