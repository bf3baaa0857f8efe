"""The EAGLE-3 head's fused k-draft program (engine.spec.eagle_runner.EagleChain) against
the step-by-step proposer it replaces (and the program with its loop unrolled): the same
drafts, round after round, as the target accepts all, some or none of them (or takes none
and decodes the first draft's token itself), for requests of different lengths (one longer
than a step's token budget: chunked catch-up) that come and go; every head page back once
they are gone; and the program lowered on idle rows for warm-up is the one a proposal then
runs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from engine import LLM, SamplingParams
from engine.core.request import Request, ScheduledBatch
from engine.spec.eagle import EagleProposer
from engine.spec.eagle_runner import EagleRunner
from tests.engine.test_spec_draft_step import warmed_program_runs
from tests.engine.test_spec_eagle import HEAD, OPTS, TARGET, V


def _llm(tmp_path: Path) -> LLM:
    """The tiny target with a random head (--load-format dummy)."""
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps(TARGET))
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps(HEAD))
    return LLM(str(cfg), speculative_algorithm="eagle", speculative_draft_model=str(head),
               **{**OPTS, "load_format": "dummy"})


def _twin(p: EagleProposer, fused: bool, unroll: bool = False) -> EagleProposer:
    """A proposer over a fresh runner of p's head (its own KV pool), on the same target,
    with the random head's matrices 10 times larger (weights of 0.2, not 0.02: its chained
    rows then draft what their inputs say, not the same token again)."""
    r = p.runner
    params = {n: w if n in ("d2t", "layers") or w.ndim == 1 else w * 10
              for n, w in r.params.items()}
    runner = EagleRunner(r.ec, params, r.target, r.backend, num_pages=r.num_pages,
                         max_model_len=1024, buckets=r.buckets)
    return EagleProposer(runner, p.page_size, r.num_pages, p.vocab_size, fused=fused,
                         unroll=unroll)


def test_fused_drafts_equal_step_by_step_ones(tmp_path: Path) -> None:
    llm = _llm(tmp_path)
    base = llm.engine.proposer
    target = base.runner.target
    rng = np.random.default_rng(5)
    # Features of every target slot: random (both proposers read the same pool).
    target.hidden = jax.device_put(
        rng.standard_normal(target.hidden.shape).astype(target.hidden.dtype),
        target.hidden.sharding)
    fused, steps, unrolled = _twin(base, True), _twin(base, False), _twin(base, True, True)
    sp = SamplingParams(temperature=0)
    per_req = -(-160 // target.page_size)  # target pages: room for every round's tokens
    free = iter(range(target.num_pages))

    def request(rid: str, n: int) -> Request:
        r = Request(rid, rng.integers(1, V, size=n).tolist(), sp, seed=0)
        r.output_token_ids.append(int(rng.integers(1, V)))  # the prompt's computed token
        r.page_ids = [next(free) for _ in range(per_req)]
        return r

    reqs = [request(f"r{i}", n) for i, n in enumerate((5, 70, 17))]  # 70: over a step's 32
    k, accepted = 4, []
    for rnd in range(6):
        if rnd == 3:  # one leaves (its head pages go back), another arrives
            reqs = [reqs[0], reqs[2], request("r3", 30)]
        got, want = fused.propose(reqs, k), steps.propose(reqs, k)
        assert got == want == unrolled.propose(reqs, k), rnd
        assert all(len(d) == k for d in got)
        for r, d in zip(reqs, got, strict=True):  # the target keeps n drafts, then its own
            if rnd == 1 and r is reqs[0]:  # a step that took no drafts (a prompt chunk ran)
                r.output_token_ids.append(d[0])  # and decoded what the head guessed
                continue
            n = int(rng.integers(0, k + 1))
            accepted.append(n)
            r.output_token_ids += d[:n] + [int(rng.integers(1, V))]
    assert min(accepted) == 0 and max(accepted) == k  # both extremes were exercised
    np.testing.assert_allclose(np.asarray(fused.runner._prev)[:3],
                               np.asarray(steps.runner._prev)[:3], rtol=1e-5, atol=1e-5)
    for p in (fused, steps, unrolled):
        p.propose([], k)  # no request left: every page comes back
        assert p.pool.num_free == p.pool.num_pages


def test_lowered_idle_program_is_the_one_a_proposal_runs(tmp_path: Path) -> None:
    """Warm-up's hook: the program lowered on idle rows and compiled is the one the first
    proposal of that shape finds (nothing compiles then), and it wrote no K/V."""
    p = _llm(tmp_path).engine.proposer
    r = p.runner
    req = Request("a", list(range(1, 12)), SamplingParams(temperature=0), seed=0)
    req.page_ids = [0, 1]
    s = p._seq(req, 3)
    s.computed = req.num_tokens - 2  # caught up: the proposal is the fused program alone
    batch = ScheduledBatch([p._row(s, req.num_tokens - 2, 1, sample=True)])
    drafts = warmed_program_runs(r, batch, lambda *shape: p._chain.lower_idle(*shape, 3),
                                 lambda: p._chain(batch, [5], 3))
    assert drafts.shape == (1, 3)
