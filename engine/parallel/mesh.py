"""The device mesh and multi-host start-up.

One mesh axis, "tp": the devices one model is sharded over. With several processes
(jax.distributed), jax.devices() lists every process's devices and the mesh spans them
all; each process runs the same scheduler on the same requests (multi-controller SPMD).
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh

from engine.config import ParallelOptions

log = logging.getLogger(__name__)

TP = "tp"
"""The tensor-parallel mesh axis."""

_initialized = False


def init_distributed(opts: ParallelOptions, platform: str) -> None:
    """jax.distributed.initialize from config (once per process; a no-op for one process).

    Must run before the first computation. On the CPU, cross-process collectives go
    through gloo (the tests run two processes over loopback)."""
    global _initialized
    if opts.num_processes == 1 or _initialized:
        return
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would take SIGTERM, which the server needs for its drain.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=opts.coordinator_address,
                               num_processes=opts.num_processes, process_id=opts.process_id)
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d global devices (%d local)",
             opts.process_id, opts.num_processes, len(jax.devices()), len(jax.local_devices()))


def make_mesh(opts: ParallelOptions, devices: list[jax.Device]) -> Mesh | None:
    """A 1-D mesh of `tensor_parallel_size` devices, or None for one device in one process."""
    tp = opts.tensor_parallel_size
    if tp == 1 and opts.num_processes == 1:
        return None
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size={tp} needs {tp} devices, but only "
                         f"{len(devices)} are visible ({devices[0].platform})")
    if opts.num_processes > 1 and tp != len(devices):
        raise ValueError(f"with {opts.num_processes} processes the mesh spans every device: "
                         f"set tensor_parallel_size to {len(devices)}, got {tp}")
    return Mesh(np.array(devices[:tp]), (TP,))
