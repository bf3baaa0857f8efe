"""Orbax checkpoints (engine convert / --load-format orbax) against the engine's own load.

- A tiny HF checkpoint (Qwen2: biases, so bqkv too; converted by `engine convert`) and the
  default GGUF, saved and restored, equal the weights the engine loads from the source,
  array for array (fused, unfused, stacked for lax.scan, and quantized int8 / f32 with
  their metadata).
- Restored at TP 1, 2 and 4 on forced CPU devices, a tiny model gives TP 1's greedy tokens,
  with its weights on the shardings of the mesh (fused q/k/v split back where the mesh
  replicates the KV heads).
- Broken or missing folders give one-line errors that say what to do.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from engine.backend import get_backend
from engine.builder import LoadedModel, load_weights
from engine.cli import main as engine_main
from engine.config import EngineConfig
from engine.convert import convert
from engine.loader import orbax
from engine.loader.checkpoint import ModelLoadError, expected_shapes
from engine.loader.load import load_checkpoint
from engine.model.config import ModelConfig
from engine.model.quant import pack
from engine.model.weights import fuse_qkv, params_from_hf
from engine.parallel.mesh import TP
from engine.parallel.sharding import make_rules, named_sharding
from tests.models.prequant_checkpoints import MOE_CONFIG, write_checkpoint
from tests.models.test_loader import tiny_hf_model
from tests.parallel.test_tensor_parallel import TINY, TINY_MOE, run_worker


def engine_weights(model: str | None, scan: bool = False, **opts) -> LoadedModel:
    """What an engine on the CPU backend (no preset) runs, loaded from `model`."""
    cfg = EngineConfig.build(None, model=model, backend="cpu", **opts)
    backend = get_backend("cpu", dict(cfg.backend.options))
    return load_weights(cfg, backend, jnp.dtype(cfg.model.dtype or "float32"), scan)


def assert_same_params(got: dict, want: dict) -> None:
    """Same tree (QuantizedWeight formats and shapes are part of it), equal arrays."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_hf_model("qwen2").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_orbax(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "out"
    assert engine_main(["convert", str(tiny_hf), str(out), "--backend", "cpu"]) == 0
    return out


def test_tiny_hf_round_trip_equals_hf_load(tiny_hf, tiny_orbax, caplog):
    want = engine_weights(str(tiny_hf))
    with caplog.at_level(logging.INFO, logger="engine.loader.orbax"):
        got = engine_weights(str(tiny_orbax))
    progress = [r.getMessage() for r in caplog.records if "orbax restore" in r.getMessage()]
    assert len(progress) > 1 and progress[-1].startswith(f"orbax restore {len(progress)}/"
                                                         f"{len(progress)}: ")
    assert "wqkv" in got.params["layers"][0] and "bqkv" in got.params["layers"][0]
    assert got.cfg == want.cfg and got.quantization is None
    assert_same_params(got.params, want.params)
    # the engine's other layouts, made from the fused checkpoint: q/k/v apart, stacked layers
    assert_same_params(engine_weights(str(tiny_orbax), fuse_qkv=False).params,
                       engine_weights(str(tiny_hf), fuse_qkv=False).params)
    assert_same_params(engine_weights(str(tiny_orbax), scan=True).params,
                       engine_weights(str(tiny_hf), scan=True).params)
    # float32 saved, bfloat16 asked: cast on restore as the HF load casts
    assert_same_params(engine_weights(str(tiny_orbax), dtype="bfloat16").params,
                       engine_weights(str(tiny_hf), dtype="bfloat16").params)
    meta = json.loads((tiny_orbax / orbax.META).read_text())
    assert meta["params"]["layers.1.wqkv"]["axes"] == ["embed", "kv_heads", None, "head_dim"]
    assert meta["params"]["embed"]["axes"] == ["vocab", "embed"]


@pytest.mark.parametrize("quantization", ["int8", "f32"])
def test_quantized_round_trip(tiny_hf, tmp_path, quantization):
    out = convert(str(tiny_hf), tmp_path / "q", backend="cpu", quantization=quantization)
    want = engine_weights(str(tiny_hf), quantization=quantization)
    got = engine_weights(str(out))  # no quantization asked: the checkpoint's is kept
    assert got.quantization == quantization
    assert_same_params(got.params, want.params)
    if quantization != "int8":
        return  # f32 is the CPU kernels' layout: a mesh leaves it off
    # on a mesh (one device here, whose "tp" axis still splits): each array where the
    # engine's own load puts it (rows with their scales)
    mesh = Mesh(np.array(jax.devices("cpu")[:1]), (TP,))
    rules = make_rules(False)
    place = functools.partial(named_sharding, mesh=mesh, rules=rules)

    def on_mesh(model: str, **opts) -> dict:
        cfg = EngineConfig.build(None, model=model, backend="cpu", **opts)
        return load_weights(cfg, get_backend("cpu"), jnp.float32, False, mesh, rules,
                            place).params

    got, want = on_mesh(str(out)), on_mesh(str(tiny_hf), quantization=quantization)
    assert_same_params(got, want)
    wqkv = got["layers"][0]["wqkv"]
    assert wqkv.data.sharding.spec[0] == TP  # rows split (KV heads with their queries)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_fp8_and_int4_weights_round_trip(tiny_hf, tmp_path):
    """The formats made at load by engine.model.quant.pack: fp8 (float8 data, per-channel
    scales) and int4 (packed codes, group scales and zero points); gate and up kept apart
    to hold one of each (two formats stay two weights when restored)."""
    want = engine_weights(str(tiny_hf), fuse_gate_up=False)
    for lp in want.params["layers"]:
        lp["w_gate"], lp["w_up"] = pack(lp["w_gate"], 1, "fp8"), pack(lp["w_up"], 1, "int4", 32)
    assert want.params["layers"][0]["w_up"].zeros is not None
    out = orbax.save(tmp_path / "q", want.cfg, want.params, dtype="float32",
                     quantization="int4", tokenizer=None, source="tiny")
    assert_same_params(engine_weights(str(out)).params, want.params)


@pytest.mark.parametrize("scheme, config", [("awq", None), ("ct-fp8", MOE_CONFIG)])
def test_prequantized_checkpoint_round_trip(tmp_path, scheme, config):
    """Pre-quantized HF checkpoints (engine.loader.prequant), saved as stored: AWQ int4
    (zero points too), and a MoE whose FP8 experts stack into one weight [X, N, K]."""
    write_checkpoint(tmp_path / "hf", scheme, config=config)
    want = engine_weights(str(tmp_path / "hf"))
    out = convert(str(tmp_path / "hf"), tmp_path / "ck", backend="cpu")
    got = engine_weights(str(out))
    assert got.quantization == want.quantization is not None
    assert_same_params(got.params, want.params)


def test_moe_round_trip(tmp_path):
    """Experts stacked [X, ...] (made here from random HF-named tensors: no compile)."""
    cfg = ModelConfig.from_hf(TINY_MOE)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(shape, dtype=np.float32)
               for n, shape in expected_shapes(cfg).items()}
    want = fuse_qkv(params_from_hf(tensors, cfg, jnp.float32, scan=False))
    out = orbax.save(tmp_path / "ck", cfg, want, dtype="float32", quantization=None,
                     tokenizer=None, source="tiny-moe")
    assert_same_params(engine_weights(str(out)).params, want)
    assert orbax.read_config(out) == cfg


def test_default_gguf_round_trip(default_gguf, default_tokenizer, tmp_path):
    want = engine_weights(str(default_gguf))  # saved as convert saves it (one GGUF load)
    out = orbax.save(tmp_path / "smollm2", want.cfg, want.params, dtype="float32",
                     quantization=None, tokenizer=want.tokenizer, source=str(default_gguf))
    got = engine_weights(str(out))
    assert_same_params(got.params, want.params)
    text = [{"role": "user", "content": "What is the capital of France?"}]
    assert (got.tokenizer.apply_chat_template(text, add_generation_prompt=True) ==
            default_tokenizer.apply_chat_template(text, add_generation_prompt=True))


def test_restore_at_tp_1_2_4_gives_tp1_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))  # 8 query heads, 2 KV heads
    out = convert(str(tmp_path / "config.json"), tmp_path / "ck", backend="cpu",
                  load_format="dummy")
    runs = run_worker(str(out), "orbax", [1, 2, 4])
    for tp in (2, 4):
        assert runs[tp]["tokens"] == runs[1]["tokens"]
        for a, b in zip(runs[tp]["logprobs"], runs[1]["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    assert runs[2]["wqkv"] == [None, "tp", None, None]  # restored onto whole KV heads
    assert runs[2]["w_down"] == ["tp", None] and runs[2]["kv_devices"] == 2
    # 2 KV heads on 4 devices: the fused weight is split back, the query heads sharded
    assert runs[4]["wqkv"] is None and runs[4]["wq"] == [None, "tp", None]


def test_missing_and_broken_folders_are_clear_errors(tiny_orbax, tmp_path):
    dev = jax.devices("cpu")[0]

    def restore(path: Path) -> None:
        orbax.restore(path, dtype=jnp.float32, place=None, device=dev, progress=False)

    with pytest.raises(ModelLoadError, match="does not exist.*engine convert"):
        restore(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="not an orbax checkpoint.*engine convert"):
        engine_weights(str(tmp_path), load_format="orbax")
    with pytest.raises(ValueError, match="--load-format orbax needs the folder"):
        engine_weights(None, load_format="orbax")
    with pytest.raises(ModelLoadError, match="orbax checkpoint.*--load-format orbax"):
        load_checkpoint(tiny_orbax)
    with pytest.raises(ValueError, match="not an empty folder"):
        convert(None, tiny_orbax, backend="cpu")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_orbax, broken)
    meta = json.loads((broken / orbax.META).read_text())
    meta["model_config"]["num_layers"] = 3
    (broken / orbax.META).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="missing parameters layers.2"):
        restore(broken)
    meta["model_config"]["num_layers"] = 2
    meta["params"]["layers.0.w_down"]["shape"] = [64, 64]
    (broken / orbax.META).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"layers.0.w_down has shape \(64, 64\).*\(128, 64\)"):
        restore(broken)
    shutil.rmtree(broken / "params")
    with pytest.raises(ModelLoadError, match="no params/ folder"):
        restore(broken)
