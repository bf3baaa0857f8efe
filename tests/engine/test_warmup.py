"""Start-up warm-up (`warmup_decode_len`, `warmup_prompt_steps`): decode steps (and wide
prompt steps) compile nothing after it, and the warm-up writes nothing into the KV cache
(its arrays stay zeros, and equal a cold engine's after the same requests)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from engine.bench.offline import CompileClock
from engine.builder import warm_up
from engine.compile import warmup_grid
from engine.llm import LLM
from engine.sampler import SamplingMode
from engine.sampling_params import SamplingParams
from tests.bench.test_offline_bench import TINY


def make(tmp_path: Path, **kw) -> LLM:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    return LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=2048,
               max_running_requests=8, chunked_prefill_size=64, **kw)


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_meets_no_compilation_after_warmup(tmp_path: Path, overlap: bool) -> None:
    clock = CompileClock()  # counts XLA compilations while active
    clock.active = True
    llm = make(tmp_path, warmup_decode_len=100, overlap_schedule=overlap)
    # Page buckets 4 and 8 (100 tokens in pages of 16) x sequence buckets 4 and 8 (the
    # decode-only ones up to 8 sequences) x 2 sampling modes (greedy, sampling), besides
    # the activation probe and the engine's small helpers.
    assert clock.compiles >= 8
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, size=int(n)).tolist() for n in (20, 33, 5)]
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    eng.add_request(prompts[0], SamplingParams(max_tokens=40, temperature=0.8, seed=1,
                                               ignore_eos=True))
    reqs = list(eng.scheduler._requests.values())
    while not all(r.output_token_ids for r in reqs):  # the prompts: mixed steps compile
        eng.step()
    clock.compiles = 0
    while eng.has_unfinished():  # decodes only, up to 73 tokens of context
        eng.step()
    assert clock.compiles == 0


def test_warmup_writes_nothing_into_the_kv_cache(tmp_path: Path) -> None:
    warm = make(tmp_path, warmup_decode_len=64)
    kv = jax.tree.leaves(warm.engine.runner.kv)
    assert kv and not any(np.asarray(x).any() for x in kv)  # still the zeros it was made as
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13]]
    cold = make(tmp_path)
    cold_out = [o.token_ids for o in cold.generate(prompts, params)]
    assert [o.token_ids for o in warm.generate(prompts, params)] == cold_out
    for w, c in zip(jax.tree.leaves(warm.engine.runner.kv), jax.tree.leaves(cold.engine.runner.kv),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(c))


@pytest.mark.parametrize("overlap", [False, True])
def test_the_first_steps_programs_compile_once(tmp_path: Path, overlap: bool) -> None:
    """The first step ever runs on the freshly made KV cache, later ones on the previous
    step's output: both must be the same program (an uncommitted first cache compiled it a
    second time, 5 s of a GPU's prefill)."""
    llm = make(tmp_path, overlap_schedule=overlap)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    clock = CompileClock()
    clock.active = True
    llm.generate([[5, 6, 7] * 10], params)
    assert clock.compiles >= 1  # the first prompt's step compiled here
    clock.compiles = 0
    llm.generate([[9, 8, 7] * 10], params)  # the same shapes again
    assert clock.compiles == 0


def test_wide_prompt_steps_meet_no_compilation_after_warmup(tmp_path: Path) -> None:
    """A prompt of over 1024 tokens is one 2048-token step (Buckets.wide_tokens: the largest
    sequence bucket), then decodes: with warmup_prompt_steps neither compiles."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "max_position_embeddings": 2048}))
    clock = CompileClock()
    clock.active = True
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=4096,
              max_running_requests=4, chunked_prefill_size=2048, warmup_decode_len=1200,
              warmup_prompt_steps=True)
    assert clock.compiles >= 2 * 5  # prompt steps: 2 modes x pages 4..64 (1200 / 16 = 75)
    clock.compiles = 0
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 500, size=1100).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                ignore_eos=True))
    assert len(out[0].token_ids) == 20
    assert clock.compiles == 0


def test_warmup_prompt_steps_needs_a_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="warmup_prompt_steps needs warmup_decode_len"):
        make(tmp_path, warmup_prompt_steps=True)


def test_warmup_compiles_on_threads_and_the_step_finds_the_programs(tmp_path: Path) -> None:
    """warm_up lowers each program and compiles it on a thread of its pool, running nothing;
    the runner's step then meets each warmed-up shape without tracing or compiling again."""
    llm = make(tmp_path, max_model_len=64)
    runner = llm.engine.runner
    threads: list[str] = []
    compiled = ("/jax/core/compile/backend_compile_duration",
                "/jax/compilation_cache/cache_retrieval_time_sec")

    def listen(event: str, duration: float, **_: object) -> None:
        if event in compiled:
            threads.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    modes = (SamplingMode(),)
    n = warm_up(runner, 64, modes=modes, threads=2)
    grid = warmup_grid(runner.buckets, runner.page_size, 64, False)
    assert n == len(grid) >= 4  # decode-only: sequence buckets 1..8 (the CPU's) x 4 pages
    assert len(threads) >= n and all(t.startswith("compile") for t in threads)
    kv = jax.tree.leaves(runner.kv)
    assert not any(np.asarray(x).any() for x in kv)  # nothing ran
    threads.clear()
    before = runner._compiles.compiles
    for t, s, p, dec in grid:
        runner.run_idle(t, s, p, dec, modes[0])
    assert threads == [] and runner._compiles.compiles == before
