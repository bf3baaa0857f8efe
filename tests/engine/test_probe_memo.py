"""The activation probe's result is remembered per program: a second start with the same
program reads it back without tracing anything; another program is measured again."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import engine.builder as builder
from backends.cpu.backend import CpuBackend
from engine import probe_memo
from engine.builder import activation_peak
from engine.config import EngineConfig
from engine.model.weights import random_params
from tests.engine.test_kv_sizing import CFG


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    return tmp_path / "probe"


def weights(dtype: jnp.dtype) -> dict:
    """The weights' abstract values: all the probe traces (nothing is made)."""
    return jax.eval_shape(lambda: random_params(CFG, dtype, scan=False))


def probe(chunk: int, params: dict | None = None) -> int:
    config = EngineConfig.build(chunked_prefill_size=chunk, max_running_requests=4)
    params = params or weights(jnp.float32)
    return activation_peak(config, CFG, params, CpuBackend(), jnp.dtype(jnp.float32), False,
                           None)


def no_trace(*_: object, **__: object) -> None:
    raise AssertionError("the probe traced a program it had measured before")


def test_a_second_probe_of_the_same_program_traces_nothing(
        cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    measured = probe(64)
    (path,) = cache.glob("*.json")
    assert measured > 0 and probe_memo.recall(path.stem) == measured
    with monkeypatch.context() as m:
        m.setattr(builder, "make_step", no_trace)
        with caplog.at_level(logging.INFO, logger="engine.builder"):
            assert probe(64) == measured
        assert "remembered" in caplog.text
        # Another program is another key, measured again: a larger step bucket, or bf16
        # weights (the weights' dtypes are part of the program).
        with pytest.raises(AssertionError, match="traced a program"):
            probe(512)
        with pytest.raises(AssertionError, match="traced a program"):
            probe(64, weights(jnp.bfloat16))
        path.write_text("{not json")  # unreadable: measured again
        with pytest.raises(AssertionError, match="traced a program"):
            probe(64)
    assert probe_memo.recall(path.stem) is None


def test_changed_sources_or_flags_make_another_key(monkeypatch: pytest.MonkeyPatch) -> None:
    key = probe_memo.probe_key(cfg=CFG, page=16)
    assert probe_memo.probe_key(cfg=CFG, page=16) == key
    assert probe_memo.probe_key(cfg=CFG, page=32) != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    assert probe_memo.probe_key(cfg=CFG, page=16) != key
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(probe_memo, "source_digest", lambda: "edited")
    assert probe_memo.probe_key(cfg=CFG, page=16) != key
