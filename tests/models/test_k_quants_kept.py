"""--quantization gguf keeps a file's Q4_K and Q6_K tensors as blocks: the kept weights are
exactly the float weights the loader dequantizes (q/k rows unpermuted, q/k/v and gate/up
fused), and the model's logits through the CPU kernel equal the float model's."""

from __future__ import annotations

import functools
import warnings

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from backends.cpu.kernels import linear as kernels
from engine.loader.load import load_checkpoint
from engine.loader.quantize import quantize_params
from engine.model.quant import QuantizedWeight, dequantize, reference_linear
from engine.model.weights import fuse_gate_up, fuse_qkv, params_from_hf, unfuse_gate_up, unfuse_qkv
from tests.backends.cpu.test_linear_kernel import random_k_blocks
from tests.models.test_loader import tiny_hf_model, write_gguf
from tests.models.test_quantized_model import logits

FORMATS = {QT.Q4_K: "q4_k", QT.Q6_K: "q6_k"}
"""K-quant types (gguf-py cannot quantize them: random blocks stand in)."""


@pytest.mark.parametrize("gate,vtype", [(QT.Q6_K, QT.Q4_K), (QT.Q4_K, QT.Q4_K), (QT.Q6_K, QT.Q6_K)],
                         ids=["gate_q6_k", "gate_q4_k", "v_q6_k"])
def test_k_quants_kept(tmp_path, monkeypatch, gate, vtype):
    """Attention weights and the embedding Q4_K, the MLP and the head Q6_K; or the MLP's gate
    Q4_K (gate and up in two formats: kept as two weights, not one float fused weight); or
    attn_v Q6_K as Q4_K_M files store it (q/k/v kept as three weights)."""
    # Every dim a multiple of 256 (the K-quants' block): E = F = Hq * D = 256.
    model = tiny_hf_model("llama")
    for key, value in dict(hidden_size=256, intermediate_size=256, head_dim=64).items():
        setattr(model.config, key, value)
    rng = np.random.default_rng(0)
    ref = {}
    for name, v in model.state_dict().items():
        if v.ndim == 1:  # norms [E]
            shape = (256,)
        elif "embed" in name or "lm_head" in name:  # [V=128, E]
            shape = (v.shape[0], 256)
        elif "k_proj" in name or "v_proj" in name:  # 2 KV heads of 64
            shape = (128, 256)
        else:
            shape = (256, 256)
        ref[name] = rng.standard_normal(shape).astype(np.float32)

    real = gguf.quants.quantize

    def quantize(arr: np.ndarray, t: QT) -> np.ndarray:  # gguf-py cannot make K-quants
        if t not in FORMATS:
            return real(arr, t)
        return random_k_blocks(rng, FORMATS[t], arr.shape[0], arr.shape[1] // 256)

    monkeypatch.setattr(gguf.quants, "quantize", quantize)
    types = {"token_embd.weight": QT.Q4_K, "output.weight": QT.Q6_K}
    for i in range(model.config.num_hidden_layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            types[f"blk.{i}.{part}.weight"] = QT.Q4_K
        for part in ("ffn_gate", "ffn_up", "ffn_down"):
            types[f"blk.{i}.{part}.weight"] = QT.Q6_K
        types[f"blk.{i}.ffn_gate.weight"] = gate
        types[f"blk.{i}.attn_v.weight"] = vtype
    path = write_gguf(tmp_path / "k.gguf", model.config, ref, QT.F32, types=types)
    with warnings.catch_warnings():  # no tokenizer metadata written
        warnings.simplefilter("ignore")
        ckpt = load_checkpoint(str(path), progress=False)
    cfg = ckpt.config

    def params() -> dict:
        p = params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=True)
        fuse_gate_up(fuse_qkv(p))
        return p

    floats, kept = params(), quantize_params(params(), cfg, "gguf", path)
    mlp = ["w_gate_up"] if gate == QT.Q6_K else ["w_gate", "w_up"]
    attn = ["wqkv"] if vtype == QT.Q4_K else ["wq", "wk", "wv"]
    if gate != QT.Q6_K:
        unfuse_gate_up(floats)
    if vtype != QT.Q4_K:
        unfuse_qkv(floats)
    assert set(mlp + attn) <= set(kept["layers"]) and set(mlp + attn) <= set(floats["layers"])
    for name in (*attn, "wo", *mlp, "w_down"):
        w = kept["layers"][name]
        if name == "wv":
            want = FORMATS[vtype]
        else:
            want = "q4_k" if name == "w_gate" or not name.startswith("w_") else "q6_k"
        assert isinstance(w, QuantizedWeight) and w.fmt == want, name
        np.testing.assert_array_equal(np.asarray(dequantize(w)),
                                      np.asarray(floats["layers"][name]), err_msg=name)
    assert kept["lm_head"].fmt == "q6_k"
    if kernels.isa_level() >= 0:
        ids = [list(rng.integers(0, cfg.vocab_size, 32))]
        want = logits(cfg, floats, ids, reference_linear)
        got = logits(cfg, kept, ids, functools.partial(kernels.kernel, isa=kernels.isa_level()))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
