"""The CPU backend's buckets start at 1 token and 1 sequence: a batch-1 decode step computes
one row, not 16, and gives the tokens the padded step gave."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from backends.cpu.backend import CpuBackend
from engine.compile import Buckets, reachable
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.bench.test_offline_bench import TINY


def _generate(config: Path, batches: list[list[list[int]]]) -> tuple[list, set[tuple]]:
    """Greedy tokens of each batch of prompts (one engine), and the step shapes it ran."""
    llm = LLM(str(config), backend="cpu", load_format="dummy", max_total_tokens=1024,
              max_running_requests=8, chunked_prefill_size=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = [[o.token_ids for o in llm.generate(p, params)] for p in batches]
    return outs, llm.engine.runner.compiled_shapes


def test_small_decode_buckets_give_the_padded_steps_tokens(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    one = [rng.integers(1, 500, size=21).tolist()]
    three = [rng.integers(1, 500, size=int(n)).tolist() for n in (7, 30, 12)]
    small, shapes = _generate(config, [one, three])
    # (tokens, sequences, pages, decode-only, ...): batch-1 decodes ran as 1 x 1, three
    # sequences' as 4 x 4: no padding rows beyond the next power of two.
    decode = {s[:2] for s in shapes if s[3]}
    assert decode == {(1, 1), (4, 4)}, decode
    monkeypatch.setattr(CpuBackend, "capabilities", dataclasses.replace(
        CpuBackend.capabilities, min_token_bucket=16, min_seq_bucket=4))  # the old buckets
    padded, shapes = _generate(config, [one, three])
    assert {s[:2] for s in shapes if s[3]} == {(16, 4)}
    assert small == padded


def test_buckets_below_16_tokens_serve_decode_only_steps() -> None:
    b = Buckets.make(64, 8, 16, min_tokens=1, min_seqs=1)
    assert b.tokens == (1, 2, 4, 8, 16, 32, 64) and b.seqs == (1, 2, 4, 8)
    assert b.shape_for(1, 1, 3) == (1, 1, 4)  # a batch-1 decode
    assert b.shape_for(3, 3, 3) == (4, 4, 4)
    assert b.shape_for(5, 1, 1) == (16, 1, 4)  # a 5-token prompt chunk: 16 tokens, as before
    assert b.shape_for(6, 3, 1) == (16, 4, 4)
    grid = reachable(b)
    assert {(t, s) for t, s, _, dec in grid if t < 16} == {(1, 1), (2, 2), (4, 4), (8, 8)}
    assert all(dec for t, _, _, dec in grid if t < 16)
    # reachable() is exactly the programs batches need (as for the default buckets in
    # tests/backends/tpu/test_precompile.py), here with wide steps from 32 tokens.
    b = dataclasses.replace(b, wide_tokens=32)
    needed = {(*b.shape_for(n_tok, n_seq, n_pages), n_tok == n_seq)
              for n_tok, n_seq, n_pages in itertools.product(range(1, 65), range(1, 9),
                                                             range(1, 17)) if n_seq <= n_tok}
    assert set(reachable(b)) == needed and len(reachable(b)) == len(needed)
