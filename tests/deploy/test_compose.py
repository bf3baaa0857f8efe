"""Compose files for one machine: the image, the mounted engine config, devices per backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config import EngineConfig
from engine.deploy.cli import render
from tests.deploy.conftest import PRESETS, backend_of, parse, render_docs


@pytest.mark.parametrize("preset", PRESETS)
def test_compose_runs_the_backend_image_with_the_config(preset: str, tmp_path: Path) -> None:
    files = render_docs("--config", preset, "--target", "compose", "--shutdown-timeout", "50")
    (compose,) = files["engine.compose.yaml"]
    (engine_yaml,) = files["engine.engine.yaml"]
    backend = backend_of(preset)
    svc = compose["services"]["engine"]
    assert svc["image"] == f"engine:{backend}"
    mount = "./engine.engine.yaml:/etc/engine/config.yaml:ro"
    assert mount in svc["volumes"]
    assert svc["command"][svc["command"].index("--config") + 1] == "/etc/engine/config.yaml"
    assert svc["environment"]["ENGINE_PORT"] == "30000"
    assert int(svc["stop_grace_period"].rstrip("s")) > 50  # longer than the drain
    assert any(v.endswith(":/var/cache/engine") for v in svc["volumes"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(engine_yaml))  # the file the container mounts
    assert EngineConfig.build(config) == EngineConfig.build(preset)
    if backend == "cuda":
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["count"] >= 1
    elif backend == "rocm":
        assert {"/dev/kfd", "/dev/dri"} <= set(svc["devices"])
    elif backend == "npu":
        assert "/dev/davinci0" in svc["devices"]
    elif backend == "tpu":
        assert svc["privileged"] is True and svc["network_mode"] == "host"
    else:
        assert "devices" not in svc and "deploy" not in svc


def test_compose_is_one_copy() -> None:
    with pytest.raises(ValueError, match="replicas=2"):
        render(parse("--config", "cpu", "--target", "compose", "--replicas", "2", "--dry-run"))
