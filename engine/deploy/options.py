"""Deployment keys: the `deploy:` section of a config, overridable on the command line.

Precedence, as for the engine options: CLI > the config file's `deploy:` section > defaults.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
TOPOLOGY = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$")
TPU_HOST_CHIPS = 4
"""Chips per host in a multi-host v5e/v6e slice (a single host has up to 8: 1x1, 2x2, 2x4)."""
TPU_SINGLE_HOST_MAX = 8


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    name: str = "engine"
    """Name of the Kubernetes objects, the compose service and the SkyPilot task (a DNS
    label: lower-case letters, digits and '-', at most 40 characters)."""
    image: str | None = None
    """Container image; None: engine:<backend>, the tag `make image BACKEND=...` gives."""
    replicas: int = 1
    """Independent copies of the server behind one Service (Kubernetes) or SkyServe."""
    dp: int = 1
    """Engine replicas inside each copy, behind the cache-aware router (`engine serve --dp`);
    each gets accelerators / dp of the copy's devices."""
    port: int = 30000
    """Port the server listens on in the container; the Service and the probes use it."""
    accelerator: str | None = None
    """Accelerator type: a GPU name for SkyPilot (H100, MI300X), the TPU generation (v5e,
    v6e), an NPU (910B); None: the backend's default (engine.deploy.hardware)."""
    accelerators: int | None = None
    """Devices per host; None: tensor_parallel_size x dp (or the TPU topology's chips)."""
    tpu_topology: str | None = None
    """TPU slice topology ('2x4', '4x4', ...). Up to 8 chips is one host; a larger slice is
    one process per host of 4 chips (multi-host: an indexed Job, --nnodes/--node-rank)."""
    cpu: str = "4"
    """CPU request per pod (a Kubernetes quantity); also SkyPilot's minimum vCPUs."""
    memory: str = "16Gi"
    """Memory request per pod (a Kubernetes quantity)."""
    cache_volume: str | None = None
    """PersistentVolumeClaim for the persistent compilation cache and downloaded models
    ($ENGINE_CACHE_DIR); None: an emptyDir (compiled programs are lost with the pod)."""
    model_volume: str | None = None
    """PersistentVolumeClaim holding model checkpoints, mounted read-only at /models."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests may finish after SIGTERM (`--shutdown-timeout`); the pod's
    grace period is longer."""
    startup_timeout: int = 3600
    """Seconds a copy may take to load and compile before it counts as failed."""

    def __post_init__(self) -> None:
        if not DNS_LABEL.match(self.name):
            raise ValueError(f"deploy name {self.name!r} must be a DNS label: lower-case "
                             f"letters, digits and '-', starting with a letter, at most 40")
        for key in ("replicas", "dp", "startup_timeout"):
            if getattr(self, key) < 1:
                raise ValueError(f"deploy {key} must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"deploy port must be in 1..65535, got {self.port}")
        if self.accelerators is not None and self.accelerators < 1:
            raise ValueError(f"deploy accelerators must be >= 1, got {self.accelerators}")
        if self.shutdown_timeout <= 0:
            raise ValueError(f"deploy shutdown_timeout must be > 0, got {self.shutdown_timeout}")
        if self.tpu_topology is not None and not TOPOLOGY.match(self.tpu_topology):
            raise ValueError(f"tpu_topology must look like 2x4 or 4x4x4, got "
                             f"{self.tpu_topology!r}")

    @property
    def tpu_chips(self) -> int | None:
        """Chips in the TPU slice, from the topology (None without one)."""
        if self.tpu_topology is None:
            return None
        return math.prod(int(d) for d in self.tpu_topology.split("x"))

    @property
    def hosts(self) -> int:
        """Processes (pods, VMs) one copy spans: > 1 only for a multi-host TPU slice."""
        chips = self.tpu_chips
        if chips is None or chips <= TPU_SINGLE_HOST_MAX:
            return 1
        if chips % TPU_HOST_CHIPS:
            raise ValueError(f"{self.tpu_topology=}: a multi-host slice has a multiple of "
                             f"{TPU_HOST_CHIPS} chips, got {chips}")
        return chips // TPU_HOST_CHIPS

    @property
    def grace_period(self) -> int:
        """terminationGracePeriodSeconds: the drain deadline plus time to exit after it."""
        return math.ceil(self.shutdown_timeout) + 30

    @classmethod
    def build(cls, section: dict[str, Any] | None, **overrides: Any) -> DeployOptions:
        """Defaults < the `deploy:` section < overrides (None values are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = dict(section or {})
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown deploy key(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(sorted(known))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
