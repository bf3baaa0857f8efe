"""A backend whose hardware jax does not see is an error that says so, raised before anything
is loaded; running its kernels in the Pallas interpreter on the CPU is asked for explicitly
(--interpret, YAML `backend: {interpret: ...}`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import pytest

import engine.builder
from engine.backend import get_backend
from engine.cli import main
from engine.config import EngineConfig
from engine.llm import LLM
from engine.options import add_engine_args, engine_options
from tests.bench.test_offline_bench import TINY

ABSENT = [
    pytest.param("tpu", "TPU", "jax[tpu]", marks=pytest.mark.skipif(
        jax.default_backend() == "tpu", reason="a TPU is present")),
    pytest.param("cuda", "NVIDIA GPU", "jax[cuda12]", marks=pytest.mark.skipif(
        jax.default_backend() == "gpu", reason="a GPU is present")),
]


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny model config; loading any model fails the test (the error must come first)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))

    def no_loading(*args, **kwargs):
        pytest.fail("the model was loaded before the missing hardware was reported")

    monkeypatch.setattr(engine.builder, "load_model", no_loading)
    return str(config)


@pytest.mark.parametrize("backend, hardware, plugin", ABSENT)
def test_llm_without_the_hardware_is_an_error_before_loading(tiny, backend, hardware, plugin):
    with pytest.raises(ValueError) as e:
        LLM(tiny, backend=backend, load_format="dummy")
    msg = str(e.value)
    assert f"backend {backend!r}: no {hardware} found; jax sees only" in msg
    assert "cpu device" in msg and f"pip install -U '{plugin}'" in msg and "--interpret" in msg


@pytest.mark.parametrize("backend, hardware, plugin", ABSENT)
def test_generate_cli_prints_one_error_line(tiny, backend, hardware, plugin, capsys):
    code = main(["generate", "--backend", backend, "--model", tiny, "--load-format", "dummy",
                 "hello"])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("engine: error:")]
    assert code == 2 and len(errors) == 1 and f"no {hardware} found" in errors[0]


def test_interpreting_is_asked_for_by_flag_or_yaml(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_options(p.parse_args(["--interpret"]))["interpret"] is True
    assert "interpret" not in engine_options(p.parse_args([]))
    config = EngineConfig.build(None, backend="tpu", interpret=True)
    assert dict(config.backend.options) == {"interpret": True}
    tpu = get_backend("tpu", dict(config.backend.options))
    assert tpu.capabilities.platform == "cpu" and tpu.chip == "interpret"
    yaml = tmp_path / "tpu.yaml"
    yaml.write_text("backend: {name: tpu, interpret: hlo, kv_pages_per_block: 2}\n")
    assert dict(EngineConfig.build(yaml).backend.options) == {
        "interpret": "hlo", "kv_pages_per_block": 2}
    assert dict(EngineConfig.build(yaml, interpret=True).backend.options)["interpret"] is True
    cuda = get_backend("cuda", {"interpret": True})
    assert cuda.interpret is True and cuda.capabilities.platform == "cpu"
