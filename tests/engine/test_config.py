"""Engine configuration: a YAML file's values are checked, and explicit options win."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig


def test_yaml_values_are_checked_and_explicit_options_win(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {fuse_qkv: false}\nscheduler: {max_running_requests: 8}\n")
    config = EngineConfig.build(f, max_running_requests=4)
    assert config.model.fuse_qkv is False and config.scheduler.max_running_requests == 4
    assert EngineConfig.build().model.fuse_qkv is True
    assert EngineConfig.build(fuse_gate_up=False).model.fuse_gate_up is False
    f.write_text("model: {fuse_qkv: maybe}\n")
    with pytest.raises(ValueError, match="fuse_qkv must be true or false"):
        EngineConfig.build(f)
    with pytest.raises(TypeError, match="unknown engine option 'fuse_qvk'"):
        EngineConfig.build(fuse_qvk=False)


def test_a_yaml_typo_names_the_key_and_the_valid_ones(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("cache: {page_sise: 4}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'page_sise' in section 'cache'; "
                                         r"expected: .*page_size"):
        EngineConfig.build(f)
