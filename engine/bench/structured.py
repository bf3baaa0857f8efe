"""`engine bench structured`: inter-token latency with and without a JSON schema, and the host
time spent computing grammar token masks.

For each batch size, the same engine decodes the same chat prompt twice: unconstrained, then
constrained by SCHEMA (which cannot complete within the measured steps, so the batch stays
full). ITL is the median time of one decode step (every row gets a token per step). The mask
time is the host time in the grammar backend's fill_masks, per token and per step; it runs
while the device computes the forward, so it costs ITL only where it outlasts the forward.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from engine.sampling_params import SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["street", "city"]},
    },
    "required": ["name", "age", "email", "role", "address"],
}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON,
                                                      "minItems": 50}},
          "required": ["people"]}
"""A list of nested records; 50 of them take far more tokens than a measurement."""
PROMPT = [{"role": "user", "content": "List 50 people as JSON: name, age, email, role, "
           "scores and address of each."}]


def measure(llm: Any, batch: int, output_len: int, constrained: bool,
            warmup_steps: int = 3) -> dict[str, Any]:
    """Decode `batch` copies of PROMPT; time `output_len` steps after `warmup_steps`."""
    eng, runner = llm.engine, llm.engine.runner
    if getattr(llm.tokenizer, "chat_template", None):
        ids = llm.apply_chat_template(PROMPT)
    else:  # e.g. random weights with a bare tokenizer
        ids = llm.tokenizer.encode(PROMPT[0]["content"])
    sp = SamplingParams(max_tokens=output_len + warmup_steps + 8, temperature=0.0,
                        ignore_eos=True, json_schema=SCHEMA if constrained else None)
    rids = [eng.add_request(ids, sp) for _ in range(batch)]
    pending = set(rids)
    while pending:  # until every request has its first token
        pending -= {o.request_id for o in eng.step()}
    for _ in range(warmup_steps):
        eng.step()
    mask_s, mask_rows = runner.mask_time_s, runner.mask_rows
    times = []
    for _ in range(output_len):
        t = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        if any(o.finished for o in outs):
            raise RuntimeError("a request finished during the measurement: the batch shrank")
    mask_s, mask_rows = runner.mask_time_s - mask_s, runner.mask_rows - mask_rows
    for rid in rids:
        eng.abort(rid)
    return {"batch": batch, "constrained": constrained, "itl_s": statistics.median(times),
            "itl_p90_s": sorted(times)[int(0.9 * len(times))],
            "mask_s_per_token": mask_s / mask_rows if mask_rows else 0.0,
            "mask_s_per_step": mask_s / output_len}


def compare(llm: Any, batch: int, output_len: int) -> dict[str, Any]:
    """Both variants at one batch size; a short untimed run of each compiles its shapes."""
    for constrained in (False, True):
        measure(llm, batch, 2, constrained, warmup_steps=1)
    plain = measure(llm, batch, output_len, False)
    json_ = measure(llm, batch, output_len, True)
    return {"batch": batch, "itl_plain_s": plain["itl_s"], "itl_json_s": json_["itl_s"],
            "itl_plain_p90_s": plain["itl_p90_s"], "itl_json_p90_s": json_["itl_p90_s"],
            "ratio": json_["itl_s"] / plain["itl_s"],
            "mask_us_per_token": json_["mask_s_per_token"] * 1e6,
            "mask_ms_per_step": json_["mask_s_per_step"] * 1e3}


def compile_time(llm: Any, reps: int = 5) -> float:
    """Seconds to compile SCHEMA into a fresh matcher (the cache bypassed), median."""
    backend = llm.engine.grammar_compiler().backend
    spec = SamplingParams(json_schema=SCHEMA).grammar
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        backend.compile(spec).matcher()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


HEADER = (f"{'batch':>6} {'ITL ms':>9} {'ITL json ms':>12} {'ratio':>7} "
          f"{'mask us/tok':>12} {'mask ms/step':>13}")


def row_line(r: dict[str, Any]) -> str:
    return (f"{r['batch']:>6} {r['itl_plain_s'] * 1e3:>9.2f} {r['itl_json_s'] * 1e3:>12.2f} "
            f"{r['ratio']:>7.3f} {r['mask_us_per_token']:>12.1f} {r['mask_ms_per_step']:>13.3f}")
