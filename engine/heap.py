"""The cyclic garbage collector of a long-lived engine process.

What exists when an engine is ready (modules, JAX's caches, the model's host objects, the
tokenizer) lives as long as the process: `settle` collects once, freezes it (the collector's
full collections stop walking it) and raises the thresholds, so that the per-step churn of a
few hundred running requests (deltas, sampling rows, token lists) triggers fewer young
collections and far fewer full ones. Cycles are still collected, only less often.
"""

from __future__ import annotations

import gc

# Collections of generation 0 after this many net allocations of tracked objects (Python's
# default is 700: at 400 running requests about six a step), and of the older generations
# after so many of the younger (defaults 10 and 10).
SERVING_THRESHOLDS = (20_000, 20, 20)


def settle(thresholds: tuple[int, int, int] = SERVING_THRESHOLDS) -> None:
    """Collect, freeze what is alive, and set the collector's thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
