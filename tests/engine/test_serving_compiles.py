"""Compilations while serving are counted and named (ModelRunner.serving_compiles): after a
warm-up, a step the warm-up did not cover logs a warning with its shape; one it covered
compiles nothing. /metrics shows the count (tests/server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engine.compile import reachable, step_buckets, warmup_grid
from engine.config import EngineConfig
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
    # (one sequence: the CPU's sequence buckets start at 1)
    assert "32 tokens, 1 sequences x 4 pages, with prompt tokens" in late[0].getMessage()
    before = runner.serving_compiles
    caplog.clear()
    llm.generate([[7, 8, 9] * 7], greedy)  # the same shapes again: nothing compiles
    assert runner.serving_compiles == before
    assert not [r for r in caplog.records if "while serving" in r.getMessage()]


def test_a_full_warmup_leaves_nothing_to_compile(tmp_path: Path) -> None:
    """The CUDA preset's compile settings (one page width, every step with prompt tokens
    wide, the full warm-up) on the CPU backend: the warm-up is the whole reachable grid, and
    a varied workload (prompts of 1 to 200 tokens, 1 to 8 running, greedy and sampled)
    compiles nothing after it."""
    cuda = EngineConfig.build("cuda").scheduler
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=2048,
              max_running_requests=8, chunked_prefill_size=64, max_model_len=256,
              page_buckets=cuda.page_buckets, wide_tokens=cuda.wide_tokens,
              warmup_decode_len=cuda.warmup_decode_len,
              warmup_prompt_steps=cuda.warmup_prompt_steps)
    runner = llm.engine.runner
    assert runner.warmed_up
    assert runner.buckets.pages == (16,)  # 256 tokens of context in pages of 16
    grid = reachable(runner.buckets)
    # 3 prompt steps (16, 32, 64 tokens) + 4 decode-only (1, 2, 4 and 8 sequences: the CPU's
    # buckets start at one token and one sequence; prompt steps at 16 tokens)
    assert len(grid) == 7
    assert warmup_grid(runner.buckets, 16, cuda.warmup_decode_len, True) == grid
    rng = np.random.default_rng(0)
    for wave in (1, 3, 8, 5):
        prompts = [rng.integers(1, 500, size=int(n)).tolist()
                   for n in rng.integers(1, 200, size=wave)]
        params = [SamplingParams(max_tokens=int(rng.integers(1, 40)), ignore_eos=True,
                                 temperature=float(rng.choice([0.0, 0.8])), seed=i)
                  for i in range(wave)]
        llm.generate(prompts, params)
    assert runner.serving_compiles == 0


def test_the_cuda_preset_grid_is_small() -> None:
    """The full grid of the CUDA preset (8k-token steps, 512 running, 8192-token contexts in
    pages of 16): one page width and every prompt step wide, so one program per token bucket
    with prompt tokens and one per decode-only sequence bucket, all of them warmed up."""
    s = EngineConfig.build("cuda").scheduler
    buckets = step_buckets(s, 8192 // 16, min_seqs=16)
    grid = reachable(buckets)
    assert len([g for g in grid if not g[3]]) == 10  # token buckets 16 .. 8192
    assert len([g for g in grid if g[3]]) == 6  # sequence buckets 16 .. 512
    assert warmup_grid(buckets, 16, s.warmup_decode_len, s.warmup_prompt_steps) == grid
    pow2 = EngineConfig.build("cuda", page_buckets="pow2", wide_tokens=2048).scheduler
    assert len(reachable(step_buckets(pow2, 512, 16))) > 200
