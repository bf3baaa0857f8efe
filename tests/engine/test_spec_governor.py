"""Adaptive speculation (engine.spec.governor): the rule on given step times, and an engine
that switches between speculative and plain steps keeping its outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.sampling_params import SamplingParams
from engine.spec.governor import SpecGovernor
from tests.engine.test_spec import tiny


def run(gov: SpecGovernor, steps: int, spec_s: float, plain_s: float, tokens: float
        ) -> list[bool]:
    """`steps` decisions, each observed with the given step times and tokens a row."""
    chosen = []
    for _ in range(steps):
        spec = gov.decide()
        chosen.append(spec)
        gov.observe(spec, spec_s if spec else plain_s, tokens if spec else 1.0)
    return chosen


@pytest.mark.parametrize(("spec_s", "tokens", "pays"), [
    (6.8e-3, 1.0, False),   # n-gram drafts that never match (the H200's 8B, 2026-12-04)
    (6.8e-3, 2.0, True),    # ... that match: 2 tokens in 6.8 ms beat 1 in 4.5 ms
    (48e-3, 3.9, False),    # an 8B draft of the 8B: never pays at 4 drafts
    (14.2e-3, 3.5, True),   # an EAGLE-3 head accepted often
])
def test_speculates_only_while_it_pays(spec_s: float, tokens: float, pays: bool) -> None:
    gov = SpecGovernor(probe_every=16, probe_steps=2)
    chosen = run(gov, 160, spec_s, 4.5e-3, tokens)
    assert gov.pays() is pays
    late = chosen[32:]  # after the first measurements: the favoured kind but for the probes
    assert sum(s == pays for s in late) == len(late) - sum(
        1 for i in range(33, 161) if i % 16 < 2)


def test_first_step_after_a_switch_and_prompt_steps_are_not_measured() -> None:
    gov = SpecGovernor()
    gov.observe(True, 1.0, 2.0)  # the first step: a switch from nothing
    assert gov.measured[True] == 0
    gov.observe(True, 0.01, None)  # a step with prompt tokens
    gov.observe(True, 0.01, 3.0)
    gov.observe(False, 1.0, 1.0)  # collects the speculative step in flight
    gov.observe(False, 0.005, 1.0)
    assert gov.measured == {True: 1, False: 1}
    assert gov.seconds == {True: 0.01, False: 0.005} and gov.tokens == 3.0


def test_a_text_that_turns_repetitive_turns_speculation_back_on() -> None:
    gov = SpecGovernor(probe_every=16, probe_steps=4)
    run(gov, 64, 6.8e-3, 4.5e-3, 1.0)
    assert gov.pays() is False
    chosen = run(gov, 64, 6.8e-3, 4.5e-3, 4.0)  # the probes see drafts accepted now
    assert gov.pays() is True and all(chosen[-8:-4])


def test_bad_probe_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_steps"):
        SpecGovernor(probe_every=4, probe_steps=4)


def test_engine_switches_kinds_and_keeps_outputs(tmp_path: Path) -> None:
    """Overlapped plain steps and synchronous speculative ones interleave as the governor
    decides (here: 'never pays' after the first measurements, so only probes speculate);
    greedy and seeded outputs equal the engine's without speculation."""
    rng = np.random.default_rng(1)
    base = rng.integers(1, 30, size=12).tolist()
    prompts = [base * 3, rng.integers(1, 30, size=9).tolist()]
    params = [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=50, temperature=1.0, seed=3, ignore_eos=True)]
    want = [o.outputs[0].token_ids for o in tiny(tmp_path).generate(prompts, params)]
    llm = tiny(tmp_path, overlap_schedule=True, speculative_algorithm="ngram",
               speculative_max_batch=4, speculative_adaptive=True)
    gov = llm.engine.governor
    gov.pays = lambda: False  # whatever the CPU's step times: plain steps but for the probes
    gov.probe_every, gov.probe_steps = 8, 3
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert gov.measured[True] >= gov.warm and gov.measured[False] >= gov.warm
    stats = llm.engine.scheduler.stats()
    assert stats.num_draft_tokens > 0 and stats.kv_pages_used == 0
