"""Compilations while serving are counted and named (ModelRunner.serving_compiles): after a
warm-up, a step the warm-up did not cover logs a warning with its shape; one it covered
compiles nothing. /metrics shows the count (tests/server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.bench.test_offline_bench import TINY


def test_steps_outside_the_warmup_grid_are_counted_and_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=2048,
              max_running_requests=4, chunked_prefill_size=64, warmup_decode_len=64)
    runner = llm.engine.runner
    assert runner.warmed_up and runner.serving_compiles == 0
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="engine.runner"):
        llm.generate([[3, 4, 5] * 7], greedy)  # a 21-token prompt step: not warmed up
    assert runner.serving_compiles >= 1
    late = [r for r in caplog.records if "while serving" in r.getMessage()]
    assert late and all(r.levelno == logging.WARNING for r in late)
    assert "32 tokens, 4 sequences x 4 pages, with prompt tokens" in late[0].getMessage()
    before = runner.serving_compiles
    caplog.clear()
    llm.generate([[7, 8, 9] * 7], greedy)  # the same shapes again: nothing compiles
    assert runner.serving_compiles == before
    assert not [r for r in caplog.records if "while serving" in r.getMessage()]
