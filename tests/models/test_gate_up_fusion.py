"""One gate/up weight (engine.model.weights.fuse_gate_up): the same model as gate and up apart.

Float weights are checked against HF transformers in test_llama_vs_hf (fused and split);
here the quantized schemes (rows fused by output channel), the inverse, and MoE models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.loader.quantize import quantize_params
from engine.model.quant import QuantizedWeight, pack, reference_linear
from engine.model.weights import (
    fuse_gate_up,
    fuse_quantized_gate_up,
    params_from_hf,
    unfuse_gate_up,
)
from tests.models.hf_reference import load_ours, make_hf_model, tensors_of
from tests.models.test_quantized_model import N, logits

IDS = [list(np.random.default_rng(3).integers(0, 256, N))]


@pytest.fixture(scope="module")
def tiny():
    model = make_hf_model("llama3", seed=4)
    cfg, _ = load_ours(model, scan=True)
    return cfg, tensors_of(model)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_fused_model_equals_split(tiny, method):
    """Quantizing the fused weight by output channel gives exactly the split weights' rows,
    interleaved (gate f, up f), and the model's logits do not change."""
    cfg, tensors = tiny
    split = quantize_params(params_from_hf(tensors, cfg, jnp.float32, scan=True), cfg, method,
                            None)
    fused = quantize_params(fuse_gate_up(params_from_hf(tensors, cfg, jnp.float32, scan=True)),
                            cfg, method, None)
    w = fused["layers"]["w_gate_up"]
    assert isinstance(w, QuantizedWeight) and w.fmt == method and w.out_shape == (128, 2)
    want = fuse_quantized_gate_up(split["layers"]["w_gate"], split["layers"]["w_up"])
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # gate's row f is the fused row 2f: a fusion that concatenated (not interleaved) fails
    np.testing.assert_array_equal(np.asarray(w.data[:, 2]),
                                  np.asarray(split["layers"]["w_gate"].data[:, 1]))
    if method != "int4":  # the model runs once, on the grouped scheme with zero points
        return
    got = logits(cfg, fused, IDS, reference_linear)
    ref = logits(cfg, split, IDS, reference_linear)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_fused_prequantized_parts_and_mixed_formats():
    """Pre-quantized gate/up (a checkpoint's QuantizedWeights, unrolled layers) fuse as rows;
    two formats stay two weights."""
    rng = np.random.default_rng(0)
    g, u = (jnp.asarray(rng.standard_normal((64, 96)), jnp.float32) for _ in range(2))
    fused = fuse_quantized_gate_up(pack(g, 1, "int4", 32), pack(u, 1, "int4", 32))
    ref = pack(jnp.stack([g, u], axis=-1), 1, "int4", 32)  # [E, F, 2] packed as one
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert fuse_quantized_gate_up(pack(g, 1, "fp8"), pack(u, 1, "int8")) is None
    lp = {"w_gate": pack(g, 1, "fp8"), "w_up": pack(u, 1, "int8")}
    fuse_gate_up({"layers": [lp]})
    assert set(lp) == {"w_gate", "w_up"}


@pytest.mark.parametrize("scan", [True, False])
def test_unfuse_is_the_inverse(tiny, scan):
    cfg, tensors = tiny
    want = params_from_hf(tensors, cfg, jnp.float32, scan=scan)
    got = unfuse_gate_up(fuse_gate_up(params_from_hf(tensors, cfg, jnp.float32, scan=scan)))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_moe_layers_are_left_alone():
    """Stacked experts [X, E, F] have no w_gate/w_up: nothing is fused."""
    lp = {n: jnp.ones((4, 8, 16)) for n in ("expert_gate", "expert_up")}
    lp["router"] = jnp.ones((8, 4))
    fuse_gate_up({"layers": [lp]})
    assert set(lp) == {"expert_gate", "expert_up", "router"}
