"""Prometheus metrics in the text exposition format, named after vLLM's (`engine:` for `vllm:`).

Counters and histograms are updated by the engine thread and rendered by the HTTP side, so
each holds a lock; gauges come from the scheduler snapshot the engine thread publishes.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

from engine.core.scheduler import SchedulerStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float]) -> None:
        """Each value counted and summed in order, under one lock (the engine thread
        observes a step's batch at once)."""
        with self._lock:
            counts, buckets, total = self._counts, self.buckets, self._sum
            for v in values:
                counts[bisect.bisect_left(buckets, v)] += 1
                total += v  # in order, as observe() would: the same float sum
            self._sum = total

    def render(self, name: str, help_: str, labels: str) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        cum = 0
        for le, n in zip((*map(repr, self.buckets), "+Inf"), counts, strict=True):
            cum += n
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cum}')
        lines += [f"{name}_sum{{{labels}}} {total}", f"{name}_count{{{labels}}} {cum}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._lock = threading.Lock()
        self._prompt_tokens = self._generation_tokens = 0
        self._finished: Counter[str] = Counter()

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self._prompt_tokens += n

    def add_generation_tokens(self, n: int) -> None:
        with self._lock:
            self._generation_tokens += n

    def request_finished(self, reason: str) -> None:
        with self._lock:
            self._finished[reason] += 1

    def render(self, stats: SchedulerStats | None, model_name: str,
               step_compiles: int | None = None) -> str:
        """The whole /metrics page; gauges are absent while the model loads (stats None).
        `step_compiles`: step programs compiled while serving (ModelRunner.serving_compiles)."""
        labels = f'model_name="{_escape(model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, *samples: tuple[str, float]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{{{labels}{extra}}} {value}" for extra, value in samples)

        if stats is not None:
            metric("engine:num_requests_running", "gauge",
                   "Sequences in the running batch.", ("", stats.num_running))
            metric("engine:num_requests_waiting", "gauge",
                   "Sequences waiting to be scheduled.", ("", stats.num_waiting))
            metric("engine:kv_cache_usage_perc", "gauge",
                   "KV cache usage (1 means 100 percent).", ("", stats.kv_usage))
            metric("engine:prefix_cache_hit_rate", "gauge",
                   "Prompt tokens served from the prefix cache / tokens looked up.",
                   ("", stats.prefix_hit_rate))
            metric("engine:prefix_cache_queries_total", "counter",
                   "Prompt tokens looked up in the prefix cache.", ("", stats.prompt_tokens))
            metric("engine:prefix_cache_hits_total", "counter",
                   "Prompt tokens found in the prefix cache.", ("", stats.prefix_hit_tokens))
            metric("engine:num_preemptions_total", "counter",
                   "Preemptions (a running sequence lost its pages).",
                   ("", stats.num_preemptions))
            metric("engine:spec_decode_num_draft_tokens_total", "counter",
                   "Speculative decoding: draft tokens verified.", ("", stats.num_draft_tokens))
            metric("engine:spec_decode_num_accepted_tokens_total", "counter",
                   "Speculative decoding: draft tokens accepted.",
                   ("", stats.num_accepted_tokens))
            metric("engine:spec_decode_acceptance_rate", "gauge",
                   "Speculative decoding: accepted / verified draft tokens.",
                   ("", stats.spec_acceptance_rate))
            metric("engine:spec_decode_tokens_per_step", "gauge",
                   "Speculative decoding: tokens a decode with drafts yields per step "
                   "(accepted drafts + 1).", ("", stats.spec_tokens_per_verify))
        if step_compiles is not None:
            metric("engine:step_compilations_total", "counter",
                   "Step programs compiled (or loaded from the compilation cache) while "
                   "serving, after start-up warm-up: each stalls the running requests.",
                   ("", step_compiles))
        with self._lock:
            prompt, gen = self._prompt_tokens, self._generation_tokens
            finished = sorted(self._finished.items())
        metric("engine:prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
               ("", prompt))
        metric("engine:generation_tokens_total", "counter", "Generated tokens.", ("", gen))
        if finished:
            metric("engine:request_success_total", "counter", "Finished sequences by reason.",
                   *((f',finished_reason="{_escape(r)}"', n) for r, n in finished))
        lines += self.ttft.render("engine:time_to_first_token_seconds",
                                  "Time to first token.", labels)
        lines += self.itl.render("engine:inter_token_latency_seconds",
                                 "Time between consecutive token deliveries.", labels)
        lines += self.e2e.render("engine:e2e_request_latency_seconds",
                                 "Arrival to last token.", labels)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
