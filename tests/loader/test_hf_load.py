"""Safetensors loading without host copies (engine.loader.hf, engine.model.transfer).

- Tiny HF checkpoints written by transformers load into parameters equal, bit for bit, to
  the HF tensors mapped in numpy here (transposed, reshaped, cast on the host: what the
  loader did before the transfer moved onto the device), in bfloat16 and float32, cast
  to bfloat16 or float32, tied or not, scanned or not.
- Under a mesh of 2 forced CPU devices (a subprocess: the device count is fixed when JAX
  starts) the parameters land on their target shardings with the same values.
- Host memory: reading a checkpoint and putting it on the device allocate no host copy of
  a tensor (tracemalloc sees numpy's allocations; a memory-mapped tensor is none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from engine.loader.checkpoint import ModelLoadError
from engine.loader.hf import load_hf
from engine.model.transfer import stored_order, to_device
from engine.model.weights import params_from_hf
from tests.models.test_loader import tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]


def hf_reference(model: torch.nn.Module, dtype: np.dtype, scan: bool) -> dict:
    """The model's parameters from HF's state dict, mapped in numpy (the layouts of
    engine.model.weights' docstring): linears [N, K] -> [K, N] split into heads."""
    c = model.config
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    e, hq, hk = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or e // hq

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x).astype(dtype)

    layers = []
    for i in range(c.num_layers if hasattr(c, "num_layers") else c.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        lp = {"attn_norm": sd[p + "input_layernorm.weight"],
              "mlp_norm": sd[p + "post_attention_layernorm.weight"],
              "wq": sd[a + "q_proj.weight"].T.reshape(e, hq, d),
              "wk": sd[a + "k_proj.weight"].T.reshape(e, hk, d),
              "wv": sd[a + "v_proj.weight"].T.reshape(e, hk, d),
              "wo": sd[a + "o_proj.weight"].T.reshape(hq, d, e),
              "w_gate": sd[p + "mlp.gate_proj.weight"].T, "w_up": sd[p + "mlp.up_proj.weight"].T,
              "w_down": sd[p + "mlp.down_proj.weight"].T}
        if a + "q_proj.bias" in sd:
            lp |= {"bq": sd[a + "q_proj.bias"].reshape(hq, d),
                   "bk": sd[a + "k_proj.bias"].reshape(hk, d),
                   "bv": sd[a + "v_proj.bias"].reshape(hk, d)}
        if a + "q_norm.weight" in sd:
            lp |= {"q_norm": sd[a + "q_norm.weight"], "k_norm": sd[a + "k_norm.weight"]}
        layers.append({n: cast(x) for n, x in lp.items()})
    out = {"embed": cast(sd["model.embed_tokens.weight"]), "norm": cast(sd["model.norm.weight"])}
    if not c.tie_word_embeddings:
        out["lm_head"] = cast(sd["lm_head.weight"].T)
    out["layers"] = ({n: np.stack([lp[n] for lp in layers]) for n in layers[0]} if scan
                     else layers)
    return out


def assert_same(got: dict, want: dict) -> None:
    g, w = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [k for k, _ in g] == [k for k, _ in w]
    for (path, a), (_, b) in zip(g, w, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, a.shape, b.shape)
        assert np.array_equal(np.asarray(a).view(np.uint8), b.view(np.uint8)), path


CASES = {  # arch, stored dtype, loaded dtype, tied, scan
    "llama_bf16": ("llama", torch.bfloat16, jnp.bfloat16, False, False),
    "qwen2_f32_to_bf16_tied": ("qwen2", torch.float32, jnp.bfloat16, True, False),
    "qwen3_bf16_to_f32_scan": ("qwen3", torch.bfloat16, jnp.float32, False, True),
}


@pytest.mark.parametrize("case", CASES)
def test_params_equal_the_host_mapping(case, tmp_path):
    arch, stored, dtype, tied, scan = CASES[case]
    model = tiny_hf_model(arch, dtype=stored, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    ckpt = load_hf(tmp_path, progress=False)
    params = params_from_hf(ckpt.tensors, ckpt.config, dtype, scan=scan)
    assert_same(params, hf_reference(model, np.dtype(dtype), scan))


def test_tensor_parallel_shards_equal_one_device(tmp_path):
    tiny_hf_model("qwen2", dtype=torch.bfloat16).save_pretrained(tmp_path)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.loader.tp_load_worker", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every parameter on its target sharding, split where the rules split it, same values.
    assert report["mismatched"] == [] and report["wrong_sharding"] == []
    assert {"wq", "wk", "wv", "wo", "w_gate", "w_down", "embed", "lm_head"} <= set(
        report["split"])


def test_views_undo_to_the_stored_bytes():
    w = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # an HF [N, K]
    view = w.T.reshape(8, 2, 3)  # [K, H, D]
    assert stored_order(view) == (1, 2, 0)
    assert stored_order(w[:, :4]) is None  # a slice with gaps: copied once
    for x in (view, w[:, :4], w):
        got = to_device(x, jnp.bfloat16)
        assert np.array_equal(np.asarray(got), x.astype(ml_dtypes.bfloat16))


def test_no_host_copy_of_a_tensor(tmp_path):
    """Old path: readinto a fresh array (the whole tensor), then ascontiguousarray and astype
    (two more): peaks of 1-3 of the 2 MiB heads. Now: none. A first load, untraced, makes
    the imports and compilations that the traced second load would otherwise count."""
    model = tiny_hf_model("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        model.resize_token_embeddings(16384, mean_resizing=False)  # [16384, 64] bf16: 2 MiB
    model.save_pretrained(tmp_path)

    def load() -> dict:
        ckpt = load_hf(tmp_path, progress=False)
        return params_from_hf(ckpt.tensors, ckpt.config, jnp.bfloat16, scan=False)

    jax.block_until_ready(load())
    tracemalloc.start()
    try:
        ckpt = load_hf(tmp_path, progress=False)
        _, read_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        params = params_from_hf(ckpt.tensors, ckpt.config, jnp.bfloat16, scan=False)
        jax.block_until_ready(params)
        _, put_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert params["lm_head"].shape == (64, 16384)
    assert read_peak < 2**20 and put_peak < 2**20, (read_peak, put_peak)


def test_unsupported_dtype_is_named(tmp_path):
    """A dtype safetensors knows and numpy lacks (float8 e8m0, MX scales) is named in the
    error (it was an unreadable file before)."""
    tiny_hf_model("llama").save_pretrained(tmp_path)
    head = json.dumps({"a": {"dtype": "F8_E8M0", "shape": [4],
                             "data_offsets": [0, 4]}}).encode()
    head += b" " * (-len(head) % 8)
    (tmp_path / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head
                                                 + bytes(4))
    with pytest.raises(ModelLoadError, match="a has dtype F8_E8M0"):
        load_hf(tmp_path, progress=False)
