"""The draft model's fused proposal program (engine.spec.draft_step) against the step-by-step
proposer it replaces: the same drafts, round after round, as the target accepts all, some or
none of them (or takes none and decodes the first draft's token itself), for requests of
different lengths (one longer than a step's token budget) that come and go; and every draft
page back in the pool once they are gone."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from engine.compile import CompileCounter
from engine.core.request import Request, ScheduledBatch
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.spec.draft import DraftModelProposer
from tests.engine.test_spec import tiny


def _twin(r: ModelRunner, fused: bool, vocab: int, unroll: bool = False) -> DraftModelProposer:
    """A proposer over a fresh runner of r's model (its own KV pool)."""
    runner = ModelRunner(r.cfg, r.params, r.backend, page_size=r.page_size,
                         num_pages=r.num_pages, max_num_tokens=r.buckets.tokens[-1],
                         max_num_seqs=r.buckets.seqs[-1], max_model_len=1024,
                         kv_dtype=jax.tree.leaves(r.kv)[0].dtype, buckets=r.buckets)
    return DraftModelProposer(runner, r.page_size, r.num_pages, vocab, fused=fused,
                              unroll=unroll)


def test_fused_drafts_equal_step_by_step_ones(tmp_path: Path) -> None:
    llm = tiny(tmp_path, chunked_prefill_size=64, speculative_algorithm="draft",
               speculative_draft_model=str(tmp_path / "config.json"))
    base = llm.engine.proposer.runner
    fused, steps, unrolled = (_twin(base, f, llm.engine.vocab_size, u)
                              for f, u in ((True, False), (False, False), (True, True)))
    rng = np.random.default_rng(3)
    sp = SamplingParams(temperature=0)
    reqs = [Request(f"r{i}", rng.integers(1, 40, size=n).tolist(), sp, seed=0)
            for i, n in enumerate((5, 70, 17))]  # 70: longer than a step's 64 tokens
    k, accepted = 4, []
    for rnd in range(6):
        if rnd == 3:  # one leaves (its draft pages go back), another arrives
            reqs = [reqs[0], reqs[2], Request("r3", rng.integers(1, 40, size=30).tolist(),
                                              sp, seed=0)]
        got, want = fused.propose(reqs, k), steps.propose(reqs, k)
        assert got == want == unrolled.propose(reqs, k), rnd
        assert all(len(d) == k for d in got)
        for r, d in zip(reqs, got, strict=True):  # the target keeps n drafts, then its own
            if rnd == 1 and r is reqs[0]:  # a step that took no drafts (a prompt chunk ran)
                r.output_token_ids.append(d[0])  # and decoded what the draft model guessed
                continue
            n = int(rng.integers(0, k + 1))
            accepted.append(n)
            r.output_token_ids += d[:n] + [int(rng.integers(1, 40))]
    assert min(accepted) == 0 and max(accepted) == k  # both extremes were exercised
    for p in (fused, steps, unrolled):
        p.propose([], k)  # no request left: every page comes back
        assert p.pool.num_free == p.pool.num_pages


def test_lowered_idle_program_is_the_one_a_proposal_runs(tmp_path: Path) -> None:
    """Warm-up's hook: the program lowered on idle rows and compiled is the one the first
    proposal of that shape finds (nothing compiles then), and it wrote no K/V."""
    llm = tiny(tmp_path, speculative_algorithm="draft",
               speculative_draft_model=str(tmp_path / "config.json"))
    p = llm.engine.proposer
    r = p.runner
    req = Request("a", list(range(1, 12)), SamplingParams(temperature=0), seed=0)
    s = p._seq(req, 3)
    batch = ScheduledBatch([p._row(s, len(s.tokens), sample=True)])
    drafts = warmed_program_runs(r, batch, lambda *shape: p._program.lower_idle(*shape, 3),
                                 lambda: p._program(batch, 3))
    assert drafts.shape == (1, 3)


def warmed_program_runs(r: ModelRunner, batch: ScheduledBatch, lower, run):
    """Warm-up's contract for a proposer's program: `lower(t, s, p, decode_only)` (lowered on
    idle rows of `batch`'s bucket shape) compiled writes no K/V of runner `r`, and then
    `run()`, the first call of that shape, compiles nothing. Returns what `run` returns."""
    tokens, md, *_ = r.prepare(batch)
    kv_before = [np.asarray(x) for x in jax.tree.leaves(r.kv)]
    lower(tokens.shape[0], md.seq_lens.shape[0], md.page_table.shape[1],
          md.decode_only).compile()
    assert all((np.asarray(x) == y).all() for x, y in zip(jax.tree.leaves(r.kv), kv_before,
                                                          strict=True))
    counter = CompileCounter()
    before = counter.compiles
    out = run()
    assert counter.compiles == before
    return out
