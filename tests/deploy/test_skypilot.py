"""SkyPilot tasks, checked against the task fields SkyPilot documents (its own schema lives in
the skypilot package, whose dependencies would replace the engine's server stack)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from engine.config import EngineConfig
from engine.deploy.cli import render
from tests.deploy.conftest import PRESETS, backend_of, parse, render_docs

# The documented task keys this renderer uses (docs.skypilot.co, "YAML spec"); closed, so
# a misspelt key fails.
STR = {"type": "string"}
TASK_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["resources", "run"],
    "properties": {
        "name": STR, "workdir": STR, "setup": STR, "run": STR,
        "num_nodes": {"type": "integer", "minimum": 1},
        "envs": {"type": "object", "additionalProperties": STR},
        "resources": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "cpus": {"type": ["string", "integer"], "pattern": r"^\d+\+?$"},
                "accelerators": {"type": "string", "pattern": r"^[A-Za-z0-9-]+(:\d+)?$"},
                "accelerator_args": {"type": "object", "additionalProperties": False,
                                     "properties": {"runtime_version": STR}},
                "ports": {"type": "array", "items": {"type": "integer"}},
            }},
        "service": {
            "type": "object", "additionalProperties": False, "required": ["readiness_probe"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "readiness_probe": {
                    "type": "object", "additionalProperties": False, "required": ["path"],
                    "properties": {"path": STR,
                                   "initial_delay_seconds": {"type": "integer"}}}}},
    },
}
SKY_PRESETS = [p for p in PRESETS if backend_of(p) != "npu"]


@pytest.mark.parametrize("preset", SKY_PRESETS)
def test_task_fits_the_documented_fields(preset: str, tmp_path: Path) -> None:
    ((name, (task,)),) = render_docs("--config", preset, "--target", "skypilot",
                                     "--replicas", "2").items()
    assert name == "engine.sky.yaml"
    jsonschema.validate(task, TASK_SCHEMA)
    backend = backend_of(preset)
    assert f".[{backend}]" in task["setup"]  # the backend's extra
    assert "engine serve" in task["run"] and "--host 0.0.0.0" in task["run"]
    assert task["resources"]["ports"] == [30000]
    assert task["service"] == {"readiness_probe": {"path": "/health",
                                                   "initial_delay_seconds": 3600},
                               "replicas": 2}
    accel = task["resources"].get("accelerators")
    if backend == "cpu":
        assert accel is None
    elif backend == "tpu":  # SkyPilot's TPU names: tpu-v6e-1, tpu-v5litepod-1
        assert accel in ("tpu-v6e-1", "tpu-v5litepod-1")
        assert task["resources"]["accelerator_args"]["runtime_version"].startswith("v2-alpha")
    else:  # one host's devices: the preset's tensor parallelism
        assert accel.endswith(f":{EngineConfig.build(preset).parallel.tensor_parallel_size}")
    # The run script writes the config it is given, and the server reads back the same one.
    config = tmp_path / "c.yaml"
    config.write_text(task["envs"]["ENGINE_CONFIG"])
    assert EngineConfig.build(config) == EngineConfig.build(preset)
    assert "$ENGINE_CONFIG" in task["run"]


def test_gpu_count_and_name_follow_the_flags() -> None:
    (task,) = render_docs("--config", "cuda", "--target", "skypilot", "--tp", "2", "--dp", "2",
                          "--accelerator", "H200")["engine.sky.yaml"]
    assert task["resources"]["accelerators"] == "H200:4"
    assert "--dp 2" in task["run"]


def test_targets_skypilot_cannot_serve_say_why() -> None:
    with pytest.raises(ValueError, match="multi-host TPU slice"):
        render(parse("--config", "tpu-v6e", "--target", "skypilot", "--tpu-topology", "4x4",
                     "--tp", "16", "--dry-run"))
    with pytest.raises(ValueError, match="no Ascend NPUs"):
        render(parse("--config", "cpu", "--backend", "npu", "--target", "skypilot",
                     "--dry-run"))
