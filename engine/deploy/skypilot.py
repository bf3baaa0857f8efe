"""SkyPilot: one task for cloud VMs (GPU or single-host TPU), launched from the repository
root (`sky launch`, or `sky serve up` for `replicas` copies behind SkyServe).

The VM installs the engine from the synced working directory with its backend's extra; the
engine config travels inside the task (an environment variable written to a file by `run`),
so the task file is the only file to hand over.
"""

from __future__ import annotations

from typing import Any

import yaml

from engine.deploy.plan import Plan

CONFIG_FILE = "~/.config/engine/deploy.yaml"
SKY_TPU = {"v5e": ("tpu-v5litepod", "v2-alpha-tpuv5-lite"), "v6e": ("tpu-v6e", "v2-alpha-tpuv6e")}
"""SkyPilot's TPU accelerator prefix and the TPU VM runtime version per generation."""


def render(plan: Plan) -> dict[str, dict[str, Any]]:
    """{file name: the SkyPilot task}."""
    d = plan.deploy
    if plan.backend == "npu":
        raise ValueError("SkyPilot offers no Ascend NPUs: deploy the npu backend with "
                         "--target k8s or --target compose")
    if d.hosts > 1:
        raise ValueError(f"a multi-host TPU slice ({d.tpu_topology}) is deployed with "
                         "--target k8s (an indexed Job); the SkyPilot task covers one host")
    serve = " ".join(["engine", "serve", "--host", "0.0.0.0", "--port", str(d.port),
                      *plan.serve_args(CONFIG_FILE)])
    task: dict[str, Any] = {
        "name": d.name,
        "workdir": ".",
        "resources": resources(plan),
        "envs": {"ENGINE_CONFIG": yaml.safe_dump(plan.engine_yaml(), sort_keys=False)},
        "setup": f"pip install -e '.[{plan.hardware.extra}]'",
        "run": f'mkdir -p ~/.config/engine && printf "%s" "$ENGINE_CONFIG" > {CONFIG_FILE}\n'
               f"exec {serve}\n",
        # Used by `sky serve up` (ignored by `sky launch`): copies behind one endpoint.
        "service": {"readiness_probe": {"path": "/health",
                                        "initial_delay_seconds": d.startup_timeout},
                    "replicas": d.replicas},
    }
    return {f"{d.name}.sky.yaml": task}


def resources(plan: Plan) -> dict[str, Any]:
    d = plan.deploy
    res: dict[str, Any] = {"cpus": f"{d.cpu}+", "ports": [d.port]}
    if plan.backend == "tpu":
        gen = (plan.accelerator or "").lower()
        if gen not in SKY_TPU:
            raise ValueError(f"TPU accelerator {plan.accelerator!r} unknown; set deploy "
                             f"accelerator to one of {', '.join(SKY_TPU)}")
        prefix, runtime = SKY_TPU[gen]
        res["accelerators"] = f"{prefix}-{plan.devices}"
        res["accelerator_args"] = {"runtime_version": runtime}
    elif plan.devices:
        res["accelerators"] = f"{plan.accelerator}:{plan.devices}"
    return res
