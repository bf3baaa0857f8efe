"""Start-up phases: one INFO line each, in order, and a summary whose parts add up."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.startup import StartupPhases
from tests.bench.test_offline_bench import TINY

PHASES = ["imports", "weights", "probe", "KV pool", "warm-up", "engine"]


def test_a_build_logs_each_phase_once_in_order(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    with caplog.at_level(logging.INFO):
        llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=256,
                  max_running_requests=2, chunked_prefill_size=32, warmup_decode_len=16)
    lines = [r.getMessage() for r in caplog.records]
    logged = [m.group(1) for line in lines
              if (m := re.fullmatch(r"start-up phase (.+): ([0-9.]+)s", line))]
    assert logged == PHASES
    phases = llm.engine.startup.phases
    assert list(phases) == PHASES and all(v >= 0 for v in phases.values())
    # The warm-up compiled programs: it took longer than the engine's construction.
    assert phases["warm-up"] > phases["engine"]
    summary = [x for x in lines if x.startswith("start-up: ")]
    assert len(summary) == 1 and "to engine built" in summary[0]
    total = float(re.match(r"start-up: ([0-9.]+)s", summary[0]).group(1))
    assert total == pytest.approx(sum(phases.values()), abs=0.051)


def test_marks_count_from_the_previous_mark_and_a_phase_may_resume() -> None:
    p = StartupPhases(since=time.monotonic() - 2.0)
    first = p.mark("imports")
    assert 2.0 <= first < 3.0
    time.sleep(0.02)
    p.mark("weights")
    p.mark("imports")  # a second mark of one phase adds to it
    assert p.phases["imports"] >= first and 0.02 <= p.phases["weights"] < 1.0
    assert list(p.phases) == ["imports", "weights"]
    assert p.summary("ready").startswith(f"start-up: {sum(p.phases.values()):.1f}s to ready")


def test_the_cpu_keeps_no_compiled_programs_on_disk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """jaxlib's CPU cache can store a program without one of its kernels (engine/compile.py):
    a CPU engine turns the persistent cache on for nothing and writes nothing under xla/."""
    import jax

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=256,
              max_running_requests=2, chunked_prefill_size=32, warmup_decode_len=16)
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "cache" / "xla").exists()
