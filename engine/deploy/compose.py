"""Compose: one machine, one container of the backend's image, the engine config
bind-mounted from a file written beside the compose file."""

from __future__ import annotations

from typing import Any

from engine.deploy.plan import CACHE_PATH, CONFIG_PATH, MODELS_PATH, Plan

NPU_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
NPU_DRIVER = ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi")


def render(plan: Plan) -> dict[str, dict[str, Any]]:
    """{file name: content}: the compose file and the engine config it mounts."""
    d = plan.deploy
    if d.replicas > 1:
        raise ValueError(f"compose runs one copy on one machine, got replicas={d.replicas}; "
                         "use dp for engine replicas behind the router, or --target k8s")
    if d.hosts > 1:
        raise ValueError(f"a multi-host TPU slice ({d.tpu_topology}) needs --target k8s")
    config_file = f"{d.name}.engine.yaml"
    svc: dict[str, Any] = {
        "image": plan.image,
        "command": plan.serve_args(),
        "environment": {"ENGINE_PORT": str(d.port)},
        "ports": [f"{d.port}:{d.port}"],
        "volumes": [f"./{config_file}:{CONFIG_PATH}:ro", f"engine-cache:{CACHE_PATH}"],
        # docker stops with SIGTERM, then kills after this: let the drain finish first.
        "stop_grace_period": f"{d.grace_period}s",
        "shm_size": "8gb",
        "restart": "unless-stopped",
    }
    volumes: dict[str, Any] = {"engine-cache": {}}
    if d.model_volume:
        svc["volumes"].append(f"{d.model_volume}:{MODELS_PATH}:ro")
        volumes[d.model_volume] = {"external": True}
    DEVICES[plan.backend](plan, svc)
    return {f"{d.name}.compose.yaml": {"name": d.name, "services": {d.name: svc},
                                       "volumes": volumes},
            config_file: plan.engine_yaml()}


def cuda(plan: Plan, svc: dict[str, Any]) -> None:
    svc["deploy"] = {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": plan.devices, "capabilities": ["gpu"]}]}}}


def rocm(plan: Plan, svc: dict[str, Any]) -> None:
    svc["devices"] = ["/dev/kfd", "/dev/dri"]  # every GPU; HIP_VISIBLE_DEVICES narrows
    svc["group_add"] = ["video"]
    svc["environment"]["HIP_VISIBLE_DEVICES"] = ",".join(map(str, range(plan.devices)))


def tpu(plan: Plan, svc: dict[str, Any]) -> None:
    # A TPU VM's chips are reached through /dev/vfio (v5e, v6e); Google's guide runs the
    # container privileged on the host network.
    svc["privileged"] = True
    svc["network_mode"] = "host"
    del svc["ports"]  # host networking publishes the port as it is


def npu(plan: Plan, svc: dict[str, Any]) -> None:
    svc["devices"] = [f"/dev/davinci{i}" for i in range(plan.devices)] + list(NPU_DEVICES)
    svc["volumes"] += [f"{p}:{p}:ro" for p in NPU_DRIVER]


DEVICES = {"cpu": lambda plan, svc: None, "cuda": cuda, "rocm": rocm, "tpu": tpu, "npu": npu}
