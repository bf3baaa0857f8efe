"""`engine bench spec`: decode output tokens/s with speculative decoding off and on, side by
side in one run and one engine (its proposer is switched off for the "off" runs).

The workload is repetitive on purpose, where prompt lookup pays: the model is asked to
repeat a given paragraph (with a tokenizer), or, without one (dummy weights), the prompt is
a random token sequence twice over. Each request decodes `output_len` tokens (ignore_eos);
the timed phase runs from when every request has its first token to the last token. Three
runs: `off` (no proposer), `on` (every step speculates) and `auto` (speculation while it
measures faster: engine.spec.governor, the engine's default).

Step time is split into the proposer's (`propose_ms`: the draft model's steps) and the
target's (`target_step_ms`: schedule, verify, accept). With a draft of the target's own
weights every draft is accepted, and `bound_tok_s` (tokens per step over the target's step
time alone) is the upper bound of the mechanism, which a real, cheaper draft approaches.
"""

from __future__ import annotations

import time

import numpy as np

from engine.sampling_params import SamplingParams
from engine.spec.governor import SpecGovernor

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night "
    "its keeper climbed the narrow stairs, trimmed the wick and polished the great lens, so "
    "that ships passing in the dark would know where the rocks were. When the keeper grew "
    "old, his daughter took over the work, and she kept the light burning through storms, "
    "fog and the long winters, until the day the lamp was replaced by an electric beacon.")


def rewrite_prompts(llm, batch: int, seed: int = 0) -> list[list[int]]:
    if llm.tokenizer is not None:
        msg = [{"role": "user", "content": f"Repeat this text word for word:\n\n{PARAGRAPH}"}]
        try:
            ids = llm.apply_chat_template(msg)
        except ValueError:  # no chat template
            ids = llm.tokenizer.encode(msg[0]["content"] + "\n\n")
        return [ids] * batch
    rng = np.random.default_rng(seed)
    vocab = llm.model_config.vocab_size
    out = []
    for _ in range(batch):
        part = rng.integers(10, vocab // 2, size=48).tolist()
        out.append(part + part)
    return out


class _Timed:
    """A proposer that adds up the time its wrapped proposer takes."""

    def __init__(self, proposer) -> None:
        self.proposer, self.seconds = proposer, 0.0

    def propose(self, requests: list, k: int) -> list[list[int]]:
        t = time.perf_counter()
        try:
            return self.proposer.propose(requests, k)
        finally:
            self.seconds += time.perf_counter() - t


def _run(eng, prompts: list[list[int]], output_len: int) -> dict:
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = eng.scheduler.stats()
    proposer = eng.proposer
    if proposer is not None:  # time the proposer apart from the target's steps
        eng.proposer = timed = _Timed(proposer)
    ids = [eng.add_request(p, sp) for p in prompts]
    outs = {}
    while len(outs) < len(ids) or any(not o.outputs[0].token_ids for o in outs.values()):
        for o in eng.step():
            outs[o.request_id] = o
    t0, steps, first = time.perf_counter(), 0, sum(len(o.outputs[0].token_ids)
                                                   for o in outs.values())
    if proposer is not None:
        timed.seconds = 0.0
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
        steps += 1
    dt = time.perf_counter() - t0
    spent = timed.seconds if proposer is not None else 0.0
    eng.proposer = proposer
    after = eng.scheduler.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs.values()) - first
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    return {"output_tok_s": tokens / dt, "decode_s": dt, "steps": steps,
            "step_ms": dt / max(steps, 1) * 1e3,
            "propose_ms": spent / max(steps, 1) * 1e3,
            "target_step_ms": (dt - spent) / max(steps, 1) * 1e3,
            "tokens_per_step": tokens / max(steps, 1) / len(prompts),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "outputs": [outs[i].outputs[0].token_ids for i in ids]}


def compare(llm, batch: int, output_len: int, warmup_runs: int = 1) -> dict:
    """Speculation off, then on, on the same prompts (each after untimed warm-up runs that
    compile its shapes). `same_outputs`: greedy outputs equal (they must)."""
    eng = llm.engine
    if eng.proposer is None:
        raise SystemExit("engine bench spec needs --speculative-algorithm")
    prompts = rewrite_prompts(llm, batch)
    proposer, row = eng.proposer, {"batch": batch, "prompt_len": len(prompts[0])}
    # "on" measures the mechanism: every step speculates, whether or not it pays; "auto"
    # speculates while it measures faster (a fresh engine.spec.governor each run).
    governor = eng.governor
    for name, prop, gov in (("off", None, None), ("on", proposer, None),
                            ("auto", proposer, SpecGovernor)):
        eng.proposer = prop
        for _ in range(warmup_runs + 1):  # the last run is the one kept
            eng.governor = gov() if gov is not None else None
            row[name] = _run(eng, prompts, output_len)
    eng.proposer, eng.governor = proposer, governor
    outputs = [row[name].pop("outputs") for name in ("off", "on", "auto")]
    row["same_outputs"] = outputs[0] == outputs[1] == outputs[2]
    row["speedup"] = row["on"]["output_tok_s"] / row["off"]["output_tok_s"]
    row["auto_speedup"] = row["auto"]["output_tok_s"] / row["off"]["output_tok_s"]
    on = row["on"]
    on["bound_tok_s"] = on["tokens_per_step"] * batch / on["target_step_ms"] * 1e3
    return row


HEADER = (f"{'batch':>6} {'prompt':>7} {'off tok/s':>10} {'off ms':>8} {'on tok/s':>9} "
          f"{'on ms':>7} {'draft ms':>9} {'tok/step':>9} {'accept':>7} {'speedup':>8} "
          f"{'bound tok/s':>12} {'auto tok/s':>11} {'auto':>6} {'same':>5}")


def row_line(r: dict) -> str:
    off, on = r["off"], r["on"]
    return (f"{r['batch']:>6} {r['prompt_len']:>7} {off['output_tok_s']:>10.1f} "
            f"{off['step_ms']:>8.2f} {on['output_tok_s']:>9.1f} {on['step_ms']:>7.2f} "
            f"{on['propose_ms']:>9.2f} {on['tokens_per_step']:>9.2f} "
            f"{on['acceptance_rate']:>7.2f} {r['speedup']:>7.2f}x {on['bound_tok_s']:>12.1f} "
            f"{r['auto']['output_tok_s']:>11.1f} {r['auto_speedup']:>5.2f}x "
            f"{str(r['same_outputs']):>5}")
