"""Warm-up's programs stored serialized (warmup_executables): a second start loads every
one of them without tracing, serves the same tokens as the start that compiled them, and
compiles nothing while serving; a stored file that cannot be loaded is compiled again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine import program_store
from engine.llm import LLM
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from tests.bench.test_offline_bench import TINY

# One running request, 16-token steps: the grid is a decode step and a 16-token prompt step,
# greedy and sampling (4 programs).
OPTIONS = dict(backend="cpu", load_format="dummy", max_total_tokens=256, max_running_requests=1,
               chunked_prefill_size=16, max_model_len=64, page_buckets="max", wide_tokens=16,
               warmup_decode_len=64, warmup_prompt_steps=True, warmup_executables=True)
PROMPTS = [[5, 9, 3], list(range(1, 30))]


def start(folder: Path) -> LLM:
    return LLM(str(folder), **OPTIONS)


def serve(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(max_tokens=6, temperature=t, seed=i, ignore_eos=True)
              for i, t in enumerate((0.0, 0.8))]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def no_trace(*_: object, **__: object) -> None:
    raise AssertionError("warm-up traced a program it had stored")


def test_a_second_start_loads_every_program_and_serves_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    first = start(tmp_path)
    stored = sorted((tmp_path / "cache" / "programs").glob("*.pkl"))
    assert len(stored) == 4 and first.engine.runner.loaded_programs == {}
    expected = serve(first)
    del first
    with monkeypatch.context() as m:
        m.setattr(ModelRunner, "lower_idle", no_trace)
        with caplog.at_level(logging.INFO, logger="engine.builder"):
            second = start(tmp_path)
    runner = second.engine.runner
    assert len(runner.loaded_programs) == 4 and "(4 loaded stored, 0 compiled" in caplog.text
    assert serve(second) == expected
    assert runner.serving_compiles == 0
    # The greedy programs swapped between their shapes (the store's digest holds the
    # mode, so only argument types can go stale): each step notices before running (nothing
    # donated), warns, and runs the jitted step: the same tokens.
    a, b = [k for k in runner.loaded_programs if k[4].all_greedy]
    runner.loaded_programs[a], runner.loaded_programs[b] = (runner.loaded_programs[b],
                                                            runner.loaded_programs[a])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.runner"):
        assert serve(second) == expected
    assert "does not fit its arguments" in caplog.text
    # A file that cannot be loaded: warm-up compiles that program (and stores it again).
    stored[0].write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="engine.program_store"):
        assert program_store.load(stored[0].stem) is None
        third = start(tmp_path)
    assert "not loaded" in caplog.text
    assert len(third.engine.runner.loaded_programs) == 3
    assert program_store.load(stored[0].stem) is not None
    assert serve(third) == expected and third.engine.runner.serving_compiles == 0
