"""LLM.update_weights: new weights in-process give a fresh engine's outputs on them, with
the step programs reused and the prefix cache flushed; mismatches are refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.compile import CompileCounter
from tests.models.hf_reference import make_hf_model, tensors_of

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"backend": "cpu", "max_total_tokens": 512, "max_running_requests": 4,
           "chunked_prefill_size": 64, "page_size": 4}
PROMPTS = [[5, 9, 200, 31, 7, 8, 13, 2, 44], [17, 3, 99, 100, 101]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def tokens(llm: LLM, compiles: list[int] | None = None) -> list[list[int]]:
    """Greedy tokens of PROMPTS; appends the programs compiled meanwhile to `compiles`."""
    n = CompileCounter().compiles
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    if compiles is not None:
        compiles.append(CompileCounter.compiles - n)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("update")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = make_hf_model("llama3", seed=seed)
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = tensors_of(model)
    llm_b = LLM(str(root / "b"), **OPTIONS)
    return {"a": LLM(str(root / "a"), **OPTIONS), "b_tokens": tokens(llm_b), "root": root,
            "b_params": llm_b.engine.runner.params, "b_hf": out["b"], "a_hf": out["a"]}


def test_hf_named_device_arrays_give_a_fresh_engines_tokens_without_recompiling(models):
    llm = models["a"]
    a_tokens = tokens(llm)
    assert a_tokens != models["b_tokens"]
    assert llm.engine.scheduler.stats().kv_pages_cached > 0
    hf = {k: jnp.asarray(v) for k, v in models["b_hf"].items()}  # a trainer's device arrays
    version = llm.update_weights(hf)
    assert version == "1" and llm.engine.weight_version == "1"
    assert llm.engine.scheduler.stats().kv_pages_cached == 0  # the old weights' K/V: gone
    compiles: list[int] = []
    assert tokens(llm, compiles) == models["b_tokens"]

    # Renamed by a mapping; then back to a's weights, in the serving form (fused, in the
    # CPU kernels' layout), whose arrays are taken as they are: no copy.
    renamed = {"trainer/" + k: v for k, v in models["a_hf"].items()}
    llm.update_weights(renamed, name_map={k: k[len("trainer/"):] for k in renamed},
                       weight_version="step-7")
    assert tokens(llm, compiles) == a_tokens and llm.engine.weight_version == "step-7"
    serving_b = models["b_params"]
    llm.update_weights(serving_b)
    wqkv = llm.engine.runner.params["layers"][0]["wqkv"]
    assert wqkv.data is serving_b["layers"][0]["wqkv"].data
    assert "w_gate_up" in serving_b["layers"][0] and "w_up" not in serving_b["layers"][0]
    assert tokens(llm, compiles) == models["b_tokens"]
    assert compiles == [0, 0, 0]  # the step programs compiled for a's weights served all


def test_an_orbax_folder_updates_through_the_start_up_loader(models):
    """What POST /update_weights_from_disk runs, on a checkpoint `engine convert` wrote."""
    from engine.builder import load_update
    from engine.convert import convert
    from engine.weights_update import swap

    out = convert(str(models["root"] / "b"), models["root"] / "b_orbax", **OPTIONS)
    llm = models["a"]
    engine = llm.engine
    new = load_update(llm.config, engine.weight_recipe, engine.runner.backend,
                      engine.runner.params, str(out))
    swap(engine, new)
    llm.model.params = new
    assert tokens(llm) == models["b_tokens"]


def test_a_mismatch_names_the_parameter_and_keeps_the_old_weights(models):
    llm = models["a"]
    before = tokens(llm)
    hf = dict(models["a_hf"])
    name = "model.layers.1.mlp.down_proj.weight"
    hf[name] = hf[name][:, :-1]  # [E, F] -> [E, F - 1]
    with pytest.raises(ValueError, match=r"down_proj.weight.*\(64, 127\).*\(64, 128\)"):
        llm.update_weights(hf)
    tree = jax.tree.map(lambda x: x, models["b_params"])  # the serving form, one layer cut
    tree["layers"][1]["w_down"] = dataclasses.replace(
        tree["layers"][1]["w_down"], data=tree["layers"][1]["w_down"].data[:-1])
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['w_down'\].*\(63, 128\).*"
                                         r"\(64, 128\)"):
        llm.update_weights(tree)
    hf = {k: v.astype(np.float16) for k, v in models["a_hf"].items()}
    with pytest.raises(ValueError, match="float16.*float32"):
        llm.update_weights(hf)
    hf = dict(models["a_hf"])
    del hf["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        llm.update_weights(hf)
    assert tokens(llm) == before


TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
TINY_MOE = {**TINY, "model_type": "qwen3_moe", "head_dim": 16, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
WORKER = """
import json, sys, jax
from engine import LLM, SamplingParams
from engine.compile import CompileCounter
sp = SamplingParams(max_tokens=6, temperature=0)
prompts = [[5, 17, 29, 3, 11, 8], [7, 7, 1]]
run = lambda llm: [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
leaf = lambda llm: jax.tree.leaves(llm.engine.runner.params)[-1]
for mode, path in zip(("tp", "ep"), sys.argv[1:]):
    kw = dict(backend="cpu", dtype="float32", load_format="dummy", tensor_parallel_size=2,
              expert_parallel=mode == "ep", max_total_tokens=256, max_running_requests=2,
              chunked_prefill_size=32)
    a, b = LLM(path, seed=1, **kw), LLM(path, seed=2, **kw)
    a_tokens, b_tokens = run(a), run(b)
    # The trainer's arrays, whole on one device: resharded onto the engine's mesh.
    one = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[3]), b.engine.runner.params)
    a.update_weights(one)
    n = CompileCounter().compiles
    print(json.dumps({"mode": mode, "differ": a_tokens != b_tokens, "same": run(a) == b_tokens,
                      "compiles": CompileCounter.compiles - n,
                      "sharded": leaf(a).sharding == leaf(b).sharding}))
"""


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory) -> dict[str, dict]:
    """TP 2 and EP 2 (the MoE) on 4 forced CPU devices, in one subprocess (the device count
    is fixed when JAX starts)."""
    paths = []
    for name, cfg in (("tp", TINY), ("ep", TINY_MOE)):
        (folder := tmp_path_factory.mktemp(name)).joinpath("config.json").write_text(
            json.dumps(cfg))
        paths.append(str(folder / "config.json"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER, *paths], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {r.pop("mode"): r for r in rows}


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_update_under_tensor_and_expert_parallelism(parallel_runs, mode):
    """Weights whole on one device are resharded onto the mesh and give a fresh sharded
    engine's tokens, with its step programs."""
    assert parallel_runs[mode] == {"differ": True, "same": True, "compiles": 0,
                                   "sharded": True}


def test_memory_release_frees_the_arrays_and_resume_gives_the_same_tokens(models):
    from engine import memory

    llm = models["a"]
    before = tokens(llm)
    kv = llm.engine.runner.kv
    freed = memory.release(llm.engine, ["kv_cache"])
    assert freed == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(kv)), abs=1024)
    assert all(x.is_deleted() for x in jax.tree.leaves(kv))
    with pytest.raises(memory.MemoryReleasedError, match="resume"):
        llm.generate(PROMPTS, GREEDY)
    assert memory.resume(llm.engine) > 0 and not llm.engine.memory_released
    compiles: list[int] = []
    assert tokens(llm, compiles) == before and compiles == [0]  # the same programs


def test_serving_form_in_shared_formats_is_packed_for_the_cpu_kernel(models):
    """A CPU engine with VNNI packs int8 weights at load (int8x); another engine's serving
    tree in the shared format (int8, unpacked: what a GPU engine holds) is packed as it
    updates, giving a fresh engine's tokens; the caller's tree is left as it was."""
    from backends.cpu.kernels import linear as kernels
    from engine.builder import load_weights

    if kernels.isa_level() < 3:
        pytest.skip("packing needs AVX-512 VNNI")
    root = models["root"]
    a = LLM(str(root / "a"), quantization="int8", **OPTIONS)
    b = LLM(str(root / "b"), quantization="int8", **OPTIONS)
    assert a.engine.runner.params["layers"][0]["wo"].fmt == "int8x"
    tree = load_weights(b.config, b.engine.runner.backend, jnp.float32, False).params
    assert tree["layers"][0]["wo"].fmt == "int8"
    a.update_weights(tree)
    assert tree["layers"][0]["wo"].fmt == "int8"
    assert a.engine.runner.params["layers"][0]["wo"].fmt == "int8x"
    assert tokens(a) == tokens(b)
