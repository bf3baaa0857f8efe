"""The ROCm backend's registration, detection, presets and option errors."""

from __future__ import annotations

import types

import jax
import pytest

from backends.rocm.backend import RocmBackend
from backends.rocm.tuning import TARGETS, target_for
from engine import backend as registry
from engine.config import EngineConfig


def fake_gpu(monkeypatch, platform_version: str) -> None:
    client = types.SimpleNamespace(platform_version=platform_version)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(client=client)])


def test_auto_detects_rocm_from_the_gpu_client(monkeypatch):
    """jax calls both GPU platforms "gpu"; the client's platform version tells them apart."""
    fake_gpu(monkeypatch, "rocm 70140")
    assert registry.detect_backend() == "rocm"
    fake_gpu(monkeypatch, "cuda 12090")
    assert registry.detect_backend() == "cuda"


def test_registered_by_name():
    assert "rocm" in registry.available_backends()
    be = registry.get_backend("rocm", {"interpret": True, "target": "gfx950"})
    assert isinstance(be, RocmBackend) and be.target is TARGETS["gfx950"]
    assert be.kv_cache_axes() == ("kv_heads", "pages", "page", "head_dim")


@pytest.mark.parametrize("preset,arch", [("rocm-mi300x", "gfx942"), ("rocm-mi355x", "gfx950")])
def test_presets_choose_their_target(preset, arch):
    cfg = EngineConfig.build(preset)
    assert cfg.backend.name == "rocm" and cfg.backend.scan_layers is False
    be = RocmBackend({**dict(cfg.backend.options), "interpret": True})
    assert be.target.arch == arch
    assert (be.decode_op, be.prefill_op) == ("triton", "triton")
    assert be.capabilities.default_dtype == "bfloat16"


def test_auto_target_follows_the_device_kind():
    assert target_for("auto", "AMD Instinct MI300X").arch == "gfx942"
    assert target_for("auto", "AMD Instinct MI355X").arch == "gfx950"


def test_unknown_target_and_op_are_clear_errors():
    with pytest.raises(ValueError, match="target='gfx1100'.*gfx942"):
        RocmBackend({"interpret": True, "target": "gfx1100"})
    with pytest.raises(ValueError, match="decode_op='ck'"):
        RocmBackend({"interpret": True, "target": "gfx942", "decode_op": "ck"})
    with pytest.raises(ValueError, match="prefill_op=aiter.*prefill_op: triton"):
        RocmBackend({"interpret": True, "target": "gfx942", "prefill_op": "aiter"})
