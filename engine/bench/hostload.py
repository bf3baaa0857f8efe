"""The host's load average around a benchmark: CPU figures are only comparable on an idle host.

On a 2-core host one other busy process halves what the engine (and its baseline) get, and
with OpenMP threads on oversubscribed cores HF transformers slowed ~30x on 2026-12-03, so a
figure taken beside other work says nothing. Every CPU benchmark prints the 1-minute load
average before and after its run, and warns (one log line, and `busy_host` in its result)
when the load before it shows other work on the cores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

BUSY_LOAD = 0.5
"""A 1-minute load average above this before a CPU run means other work shares the cores.
(It decays over about a minute: wait that long after other work ends.)"""


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


@dataclasses.dataclass
class HostLoad:
    """Load before and after one benchmark run; `busy_host` when the before figure is high."""

    load_before: float
    load_after: float | None = None
    busy_host: bool = False

    @classmethod
    def start(cls, cpu: bool) -> HostLoad:
        """Read the load before a run; on a CPU run above BUSY_LOAD, warn."""
        load = load_average()
        busy = cpu and load > BUSY_LOAD
        if busy:
            log.warning("the host's 1-minute load average is %.2f (> %.1f) before this CPU "
                        "benchmark: other work shares the cores, so its figures are not "
                        "comparable; rerun on an idle host", load, BUSY_LOAD)
        print(f"load average before: {load:.2f}" + (" (busy host)" if busy else ""), flush=True)
        return cls(load_before=load, busy_host=busy)

    def finish(self) -> HostLoad:
        self.load_after = load_average()
        print(f"load average after: {self.load_after:.2f}", flush=True)
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def on_cpu(args: Any) -> bool:
    """Whether a bench's parsed arguments (their `backend`) run on the CPU backend."""
    from engine.backend import detect_backend

    return (detect_backend() if args.backend == "auto" else args.backend) == "cpu"
