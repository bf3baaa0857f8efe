"""What every target renders from: the resolved engine config, the deploy keys, and the
hardware of the chosen backend (device counts, image, the server's command line)."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.config import EngineConfig
from engine.deploy.options import DeployOptions

CONFIG_PATH = "/etc/engine/config.yaml"
"""Where the engine config is mounted in the container (or copied on a VM)."""
CACHE_PATH = "/var/cache/engine"
"""$ENGINE_CACHE_DIR in the images: downloaded models and the compilation cache (xla/)."""
MODELS_PATH = "/models"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """How a backend's devices are asked for."""

    extra: str
    """The pyproject extra (and image tag) of the backend."""
    k8s_resource: str | None
    """Kubernetes extended resource of one device (None: CPU only)."""
    accelerator: str | None
    """Default accelerator type when the config names none."""


HARDWARE: dict[str, Hardware] = {
    "cpu": Hardware("cpu", None, None),
    "cuda": Hardware("cuda", "nvidia.com/gpu", "H100"),
    "rocm": Hardware("rocm", "amd.com/gpu", "MI300X"),
    "tpu": Hardware("tpu", "google.com/tpu", "v6e"),
    "npu": Hardware("npu", "huawei.com/Ascend910", "910B"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    config: EngineConfig
    deploy: DeployOptions
    hardware: Hardware

    @property
    def backend(self) -> str:
        return self.config.backend.name

    @property
    def image(self) -> str:
        return self.deploy.image or f"engine:{self.hardware.extra}"

    @property
    def accelerator(self) -> str | None:
        return self.deploy.accelerator or self.hardware.accelerator

    @property
    def devices(self) -> int:
        """Accelerators per host (pod, VM); 0 on the CPU backend."""
        if self.hardware.k8s_resource is None:
            return 0
        chips = self.deploy.tpu_chips
        if chips is not None:
            return chips // self.deploy.hosts
        if self.deploy.accelerators is not None:
            return self.deploy.accelerators
        return self.config.parallel.tensor_parallel_size * self.deploy.dp

    def serve_args(self, config_path: str = CONFIG_PATH) -> list[str]:
        """Arguments of `engine serve` (after the entry point's --host/--port), one host."""
        d = self.deploy
        args = ["--config", config_path, "--shutdown-timeout", f"{d.shutdown_timeout:g}"]
        if self.config.model.model:
            args += ["--model", self.config.model.model]
        if d.dp > 1:
            args += ["--dp", str(d.dp)]
        return args

    def engine_yaml(self) -> dict[str, Any]:
        """The resolved engine config as YAML sections (what `--config` reads back): None
        values and the model (passed as --model, so it is also the served name) left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.config):
            values = {k: v for k, v in dataclasses.asdict(getattr(self.config, f.name)).items()
                      if v is not None and (f.name, k) != ("model", "model")}
            if f.name == "backend":  # backend-specific settings are plain keys of the section
                values.update(dict(values.pop("options")))
            if f.name == "parallel":
                values["axis_rules"] = dict(values["axis_rules"])
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out


def make_plan(config: EngineConfig, deploy: DeployOptions) -> Plan:
    """Check that the config and the deploy keys fit together; errors name the values."""
    name = config.backend.name
    if name not in HARDWARE:
        known = ", ".join(sorted(HARDWARE))
        if name == "auto":
            raise ValueError(f"engine deploy needs a backend: set backend.name in the config or "
                             f"pass --backend ({known})")
        raise ValueError(f"engine deploy does not know backend {name!r}; known: {known}")
    if deploy.tpu_topology is not None and name != "tpu":
        raise ValueError(f"tpu_topology={deploy.tpu_topology!r} needs the tpu backend, not "
                         f"{name!r}")
    plan = Plan(config, deploy, HARDWARE[name])
    hosts, tp = deploy.hosts, config.parallel.tensor_parallel_size
    if hosts > 1:
        if deploy.dp > 1:
            raise ValueError(f"dp={deploy.dp} with a multi-host slice ({deploy.tpu_topology}): "
                             "one copy spans the hosts; use replicas for more copies")
        if tp != deploy.tpu_chips:
            raise ValueError(f"a {deploy.tpu_topology} slice has {deploy.tpu_chips} chips; "
                             f"shard the model over all of them: tensor_parallel_size={tp} "
                             f"must be {deploy.tpu_chips} (--tp {deploy.tpu_chips})")
    elif plan.devices and tp * deploy.dp > plan.devices:
        raise ValueError(f"tensor_parallel_size={tp} x dp={deploy.dp} needs {tp * deploy.dp} "
                         f"devices, but a host gets accelerators={plan.devices}")
    return plan
