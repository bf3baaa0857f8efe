"""Start-up phases: where the seconds to `ready` go, one INFO line per phase.

    start-up phase imports: 4.1s     (engine package import -> build_engine: Python imports,
                                      options, the device client's start)
    start-up phase weights: 2.0s     (loaded or made on the device, fused, quantized)
    start-up phase probe: 1.2s       (the activation probe, or its remembered result)
    start-up phase KV pool: 0.3s     (sized, allocated, the runner made)
    start-up phase warm-up: 6.9s     (the step programs compiled or loaded)
    start-up phase engine: 0.1s      (the scheduler, the proposer, the Engine)
    start-up phase server: 0.2s      (engine built -> /health turns 200)
    start-up: 14.8s to ready (imports 4.1, weights 2.0, ...)

Imported first by the engine package, so that its import marks the clock's zero: the
first build measures its imports from there, a later build in the same process from its
own start.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

IMPORTED = time.monotonic()
"""When the engine package was imported (the first start-up's zero)."""
_first = [True]


class StartupPhases:
    """Seconds of each phase since the previous mark, logged as each ends."""

    def __init__(self, since: float | None = None) -> None:
        self.t = time.monotonic() if since is None else since
        self.phases: dict[str, float] = {}

    @classmethod
    def for_build(cls) -> StartupPhases:
        """The first build in a process counts its imports from the package's import."""
        since = IMPORTED if _first[0] else None
        _first[0] = False
        phases = cls(since)
        phases.mark("imports")
        return phases

    def mark(self, name: str) -> float:
        """End phase `name` now; returns its seconds."""
        now = time.monotonic()
        dt = self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now
        log.info("start-up phase %s: %.1fs", name, dt)
        return dt

    def summary(self, what: str = "ready") -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items())
        return f"start-up: {sum(self.phases.values()):.1f}s to {what} ({parts})"
