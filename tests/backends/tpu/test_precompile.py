"""engine.precompile: the bucket grid it compiles is exactly the set of programs batches can
need, and its abstract inputs are what ModelRunner.prepare makes (so the programs match)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cpu.backend import CpuBackend
from engine.compile import Buckets, abstract_batch, reachable
from engine.core.request import Request, ScheduledBatch, ScheduledSeq
from engine.model.config import ModelConfig
from engine.model.weights import random_params
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("wide,pages", [(4096, "pow2"), (32, "pow2"), (16, "max")],
                         ids=["narrow", "wide_steps", "all_wide_one_page_width"])
def test_reachable_is_exactly_what_batches_need(wide, pages):
    """With wide steps (32 tokens or more here; every step with prompt tokens at 16),
    steps with prompt tokens from that token bucket up take the largest sequence bucket
    only; with page_buckets 'max' every step has the one page-table width."""
    buckets = Buckets.make(64, 32, 8, wide_tokens=wide, page_buckets=pages)
    needed = set()
    for n_tok, n_seq, n_pages in itertools.product(range(1, 65), range(1, 33), range(1, 9)):
        if n_seq <= n_tok:  # every sequence brings at least one token
            needed.add((*buckets.shape_for(n_tok, n_seq, n_pages), n_tok == n_seq))
    grid = reachable(buckets)
    assert len(grid) == len(set(grid))
    assert set(grid) == needed


def test_abstract_batch_matches_prepare():
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128))
    params = random_params(cfg, jnp.float32, scan=True)
    runner = ModelRunner(cfg, params, CpuBackend(), page_size=4, num_pages=32,
                         max_num_tokens=32, max_num_seqs=4, max_model_len=64,
                         kv_dtype=jnp.float32)
    req = lambda i: Request(f"r{i}", [1, 2, 3], SamplingParams(temperature=0.0), seed=i)
    for lens, decode in [([3, 5], False), ([1, 1, 1], True)]:
        seqs = [ScheduledSeq(req(i), list(range(n)), 2, list(range(3 * i, 3 * i + 3)), True)
                for i, n in enumerate(lens)]
        tokens, md, logits_idx, st, mode = runner.prepare(ScheduledBatch(seqs))
        assert md.decode_only == decode
        max_seqs = runner.buckets.seqs[-1]
        src = np.full(tokens.shape, -1, np.int32)  # as ModelRunner.launch makes it
        want = (tokens, md, logits_idx, st, np.zeros(max_seqs, np.int32), src)
        got = abstract_batch(tokens.shape[0], md.seq_lens.shape[0], md.page_table.shape[1],
                             md.decode_only, md.page_size, cfg.vocab_size, mode, None, max_seqs)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert (a.shape, a.dtype) == (np.shape(b), np.asarray(b).dtype)
