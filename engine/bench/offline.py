"""`engine bench offline`: a workload in-process; throughput, tokens computed, cache hits."""

from __future__ import annotations

import dataclasses
import json
import time

import jax

from engine.bench.datasets import BenchRequest
from engine.bench.roofline import ModelCost, StepWork
from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class OfflineResult:
    name: str
    requests: int
    elapsed_s: float
    input_tokens: int
    output_tokens: int
    computed_tokens: int | None = None
    """Tokens the model computed (prompt tokens served by the prefix cache are not)."""
    cache_hit_rate: float | None = None
    preemptions: int | None = None
    steps: int | None = None
    compile_s: float | None = None
    """Seconds inside the timed run spent tracing, lowering and compiling step programs (or
    loading them from the persistent cache): the run waits for them."""
    compiles: int | None = None
    step_time: dict[str, list] | None = None
    """{"decode": [steps, seconds], "prompt": [...]}: decode-only steps apart from steps with
    prompt tokens (seconds as ModelRunner.step_log counts them)."""
    bound_s: dict[str, float] | None = None
    """{"decode": seconds, "prompt": seconds}: the roofline of the run's own steps
    (engine.bench.roofline), at the copy bandwidth and matmul rate measured before it."""

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "request_throughput": self.requests / self.elapsed_s,
                "output_throughput": self.output_throughput,
                "total_throughput": self.total_throughput}

    def report(self) -> str:
        rows = [
            ("Backend", self.name), ("Successful requests", self.requests),
            ("Benchmark duration (s)", f"{self.elapsed_s:.2f}"),
            ("Total input tokens", self.input_tokens),
            ("Total generated tokens", self.output_tokens),
            ("Request throughput (req/s)", f"{self.requests / self.elapsed_s:.2f}"),
            ("Output token throughput (tok/s)", f"{self.output_throughput:.2f}"),
            ("Total token throughput (tok/s)", f"{self.total_throughput:.2f}"),
        ]
        if self.computed_tokens is not None:
            rows += [("Tokens computed", self.computed_tokens),
                     ("Prefix cache hit rate", f"{self.cache_hit_rate:.3f}"),
                     ("Preemptions", self.preemptions), ("Engine steps", self.steps)]
        if self.compile_s is not None:
            warm = self.elapsed_s - self.compile_s
            rows += [("Compilations (XLA)", self.compiles),
                     ("Compile time in the run (s)", f"{self.compile_s:.2f}"),
                     ("Output tok/s without it", f"{self.output_tokens / warm:.2f}")]
        if self.bound_s is not None:
            bound = sum(self.bound_s.values())
            warm = self.elapsed_s - (self.compile_s or 0.0)
            rows += [("Roofline of its steps (s)", f"{bound:.2f}"),
                     ("Run time / roofline", f"{self.elapsed_s / bound:.2f}x "
                                             f"({warm / bound:.2f}x without compilation)")]
        for kind, label in (("decode", "Decode-only steps"), ("prompt", "Steps with prompts")):
            n, sec = (self.step_time or {}).get(kind, (0, 0.0))
            if n:  # seconds as the host sees them, compilation excluded (ModelRunner.step_log)
                x = (f", {sec / self.bound_s[kind]:.2f}x roofline"
                     if self.bound_s and self.bound_s[kind] else "")
                rows.append((f"{label}: n, s, mean ms",
                             f"{n}, {sec:.2f}, {sec / n * 1e3:.2f}{x}"))
        width = max(len(k) for k, _ in rows) + 2
        return "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)


class CompileClock:
    """Sums JAX's trace, lower and compile durations (jax.monitoring events) while active."""

    def __init__(self) -> None:
        self.seconds, self.compiles, self.active = 0.0, 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **_: object) -> None:
        if self.active and (event.startswith("/jax/core/compile/")
                            or event == "/jax/compilation_cache/cache_retrieval_time_sec"):
            self.seconds += duration
            self.compiles += event.endswith("backend_compile_duration")


_clock: CompileClock | None = None


def run_engine(llm, reqs: list[BenchRequest], name: str,
               rates: tuple[float, float] | None = None) -> OfflineResult:
    """Submit every request at once (offline), run to completion, read the scheduler stats.
    With `rates` (copy bytes/s, matmul FLOP/s), also the roofline of the run's steps."""
    global _clock
    _clock = _clock or CompileClock()
    sched, runner = llm.engine.scheduler, llm.engine.runner
    sched.flush_cache()
    before = sched.stats()
    runner.step_log = []
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
              for r in reqs]
    _clock.seconds, _clock.compiles, _clock.active = 0.0, 0, True
    t0 = time.perf_counter()
    try:
        outs = llm.generate([r.prompt_ids for r in reqs], params)
    finally:
        _clock.active = False
    elapsed = time.perf_counter() - t0
    after = sched.stats()
    prompt_seen = after.prompt_tokens - before.prompt_tokens
    hits = after.prefix_hit_tokens - before.prefix_hit_tokens
    return OfflineResult(
        name=name, requests=len(reqs), elapsed_s=elapsed,
        input_tokens=sum(len(r.prompt_ids) for r in reqs),
        output_tokens=sum(len(o.token_ids) for o in outs),
        computed_tokens=after.num_computed_tokens - before.num_computed_tokens,
        cache_hit_rate=hits / prompt_seen if prompt_seen else 0.0,
        preemptions=after.num_preemptions - before.num_preemptions,
        steps=after.num_steps - before.num_steps, compile_s=_clock.seconds,
        compiles=_clock.compiles, **step_totals(llm, rates))


def step_totals(llm, rates: tuple[float, float] | None) -> dict[str, dict]:
    """From the runner's step log (then switched off): step_time, and with `rates` bound_s,
    the seconds the same steps take at the roofline; decode-only steps apart."""
    runner = llm.engine.runner
    log, runner.step_log = [StepWork(*fields) for fields in runner.step_log], None
    kv = jax.tree.leaves(runner.kv)[0]
    cost = ModelCost.of(llm.model_config, runner.params, kv.dtype.itemsize)
    times = {"decode": [0, 0.0], "prompt": [0, 0.0]}
    bound = {"decode": 0.0, "prompt": 0.0}
    for work in log:
        kind = "decode" if work.decode_only else "prompt"
        times[kind][0] += 1
        times[kind][1] += work.seconds
        if rates:
            bound[kind] += cost.step_bound(work, *rates, devices=len(kv.sharding.device_set))
    return {"step_time": times, "bound_s": bound if rates else None}


def write_json(path: str, results: list[OfflineResult], args: dict,
               host_load: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump({"args": args, "results": [r.as_dict() for r in results],
                   "host_load": host_load}, f, indent=2)
