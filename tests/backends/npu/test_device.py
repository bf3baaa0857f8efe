"""Choosing the NPU backend: torch_npu is imported only for --npu-device npu, and its
absence is one clear error that says how to install it and names --npu-device cpu."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from engine.backend import available_backends, get_backend

NO_TORCH_NPU = importlib.util.find_spec("torch_npu") is None


def test_npu_is_registered_and_cpu_device_needs_no_torch_npu():
    assert "npu" in available_backends()
    backend = get_backend("npu", {"npu_device": "cpu"})
    assert backend.capabilities.own_model_runner
    assert str(backend.torch_device) == "cpu" and backend.ops.name == "reference"
    assert "torch_npu" not in sys.modules


@pytest.mark.skipif(not NO_TORCH_NPU, reason="torch_npu is installed here")
def test_missing_torch_npu_is_one_actionable_cli_error(capsys):
    from engine.cli import main

    assert main(["generate", "--backend", "npu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engine: error:") and len(err.strip().splitlines()) == 1
    assert "pip install" in err and "--npu-device cpu" in err


def test_bad_npu_device_is_rejected():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="npu_device must be npu or cpu"):
        EngineConfig.build(None, backend="npu", npu_device="gpu")
