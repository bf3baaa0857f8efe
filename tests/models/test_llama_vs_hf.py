"""Our model's logits equal HF transformers' (torch, float32, same weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

from engine.model.weights import fuse_gate_up, fuse_qkv, params_from_hf
from tests.models.hf_reference import (
    TINY_CONFIGS,
    hf_logits,
    load_ours,
    make_hf_model,
    our_logits,
    tensors_of,
)

IDS = [3, 17, 99, 254, 8, 8, 42, 1, 0, 77, 130, 5, 61, 200, 19, 23, 7, 88, 150, 31, 2]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_logits_match_hf(name, scan, fused):
    model = make_hf_model(name)
    cfg, params = load_ours(model, scan=scan)
    if fused:  # one q/k/v and one gate/up weight, as the engine loads them
        params = fuse_gate_up(fuse_qkv(params))
        lp = params["layers"] if scan else params["layers"][0]
        assert "wqkv" in lp and "w_gate_up" in lp and "w_gate" not in lp
    ref = hf_logits(model, IDS)
    ours = our_logits(cfg, params, IDS)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_chunked_prefill_matches_hf(name):
    """Prompt chunks that extend a cached prefix give the same logits as one pass."""
    model = make_hf_model(name, seed=1)
    cfg, params = load_ours(model, scan=True)
    ours = our_logits(cfg, params, IDS, page_size=3, chunks=[5, 1, 9, 6])
    np.testing.assert_allclose(ours, hf_logits(model, IDS), atol=2e-4, rtol=1e-3)


def test_bfloat16_weights_stay_close_to_hf_float32():
    model = make_hf_model("llama3", seed=2)
    cfg, _ = load_ours(model, scan=False)
    params = params_from_hf(tensors_of(model), cfg, jnp.bfloat16, scan=False)
    ref = hf_logits(model, IDS)
    ours = our_logits(cfg, params, IDS, kv_dtype=jnp.bfloat16)
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err < 3e-2, err
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
