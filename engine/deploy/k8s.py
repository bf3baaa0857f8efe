"""Kubernetes: a ConfigMap (the engine config), a Deployment (or, for a multi-host TPU
slice, an indexed Job per copy) and a Service.

Probes: the server answers /health with 503 while it loads and compiles, so a startup probe
allows `startup_timeout` for that and only then does the liveness probe count; readiness
keeps a copy out of the Service until it can generate. The grace period outlasts
`--shutdown-timeout`, so SIGTERM drains in-flight requests before the kubelet kills.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from engine.deploy.plan import CACHE_PATH, MODELS_PATH, Plan

COORDINATOR_PORT = 8476
"""jax.distributed's coordinator on the rank-0 pod of a multi-host slice."""
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GKE_TPU = {"v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
"""GKE's `cloud.google.com/gke-tpu-accelerator` node label per TPU generation."""
PROBE_PERIOD_S = 10


def render(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """{file name: Kubernetes objects}."""
    d = plan.deploy
    objects = [config_map(plan)]
    if d.hosts > 1:
        objects += [headless_service(plan)]
        objects += [indexed_job(plan, i) for i in range(d.replicas)]
    else:
        objects += [deployment(plan)]
    objects += [service(plan)]
    return {f"{d.name}.k8s.yaml": objects}


def labels(plan: Plan) -> dict[str, str]:
    return {"app.kubernetes.io/name": plan.deploy.name, "app.kubernetes.io/part-of": "engine"}


def config_map(plan: Plan) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{plan.deploy.name}-config", "labels": labels(plan)},
            "data": {"config.yaml": yaml.safe_dump(plan.engine_yaml(), sort_keys=False)}}


def service(plan: Plan) -> dict[str, Any]:
    """The clients' entry point; for multi-host slices only the rank-0 pods serve HTTP."""
    selector = labels(plan)
    if plan.deploy.hosts > 1:
        selector = {**selector, INDEX_ANNOTATION: "0"}  # the Job controller sets this label
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": plan.deploy.name, "labels": labels(plan)},
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": plan.deploy.port, "targetPort": "http"}]}}


def deployment(plan: Plan) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": plan.deploy.name, "labels": labels(plan)},
            "spec": {"replicas": plan.deploy.replicas,
                     "selector": {"matchLabels": labels(plan)},
                     "template": pod_template(plan, plan.serve_args(), http_probes(plan))}}


def headless_service(plan: Plan) -> dict[str, Any]:
    """Stable DNS names <job>-<index>.<name>-hosts for the pods of a slice, resolvable
    before they are ready (the coordinator must be reachable while everyone starts)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{plan.deploy.name}-hosts", "labels": labels(plan)},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": labels(plan),
                     "ports": [{"name": "coordinator", "port": COORDINATOR_PORT}]}}


def indexed_job(plan: Plan, copy: int) -> dict[str, Any]:
    """One copy of the model over a multi-host slice: pod i runs process i of --nnodes."""
    d = plan.deploy
    name = d.name if d.replicas == 1 else f"{d.name}-{copy}"
    args = plan.serve_args() + [
        "--dist-init-addr", f"{name}-0.{d.name}-hosts:{COORDINATOR_PORT}",
        "--nnodes", str(d.hosts), "--node-rank", "$(ENGINE_NODE_RANK)"]
    template = pod_template(plan, args, exec_probes(plan))
    template["spec"]["subdomain"] = f"{d.name}-hosts"
    template["spec"]["restartPolicy"] = "OnFailure"
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels(plan)},
            "spec": {"completionMode": "Indexed", "completions": d.hosts,
                     "parallelism": d.hosts, "backoffLimit": 4 * d.hosts,
                     "template": template}}


def probe_timing(plan: Plan) -> dict[str, dict[str, int]]:
    return {
        # Loading and compiling may take long: nothing restarts the pod before this ends.
        "startupProbe": {"periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(plan.deploy.startup_timeout
                                                       / PROBE_PERIOD_S)},
        "livenessProbe": {"periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
        "readinessProbe": {"periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def http_probes(plan: Plan) -> dict[str, dict[str, Any]]:
    get = {"httpGet": {"path": "/health", "port": "http"}}
    return {k: {**get, **v} for k, v in probe_timing(plan).items()}


def exec_probes(plan: Plan) -> dict[str, dict[str, Any]]:
    """Multi-host: only rank 0 serves HTTP; the image's health check passes on the other
    ranks (their process dies, and the pod with it, when the group breaks)."""
    probes = {k: {"exec": {"command": ["engine-healthcheck"]}, **v}
              for k, v in probe_timing(plan).items()}
    probes["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"},
                                **probe_timing(plan)["readinessProbe"]}
    return probes


def pod_template(plan: Plan, args: list[str], probes: dict[str, Any]) -> dict[str, Any]:
    d = plan.deploy
    resources: dict[str, Any] = {"requests": {"cpu": d.cpu, "memory": d.memory}}
    if plan.hardware.k8s_resource:  # extended resources: limits only (requests follow)
        resources["limits"] = {plan.hardware.k8s_resource: plan.devices}
    env = [{"name": "ENGINE_PORT", "value": str(d.port)}]
    if d.hosts > 1:
        env.append({"name": "ENGINE_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}})
    ports = [{"name": "http", "containerPort": d.port}]
    if d.hosts > 1:
        ports.append({"name": "coordinator", "containerPort": COORDINATOR_PORT})
    mounts = [{"name": "config", "mountPath": "/etc/engine", "readOnly": True},
              {"name": "cache", "mountPath": CACHE_PATH},
              {"name": "shm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{d.name}-config"}},
        {"name": "cache", **claim_or_empty(d.cache_volume)},
        {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    if d.model_volume:
        mounts.append({"name": "models", "mountPath": MODELS_PATH, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {
            "claimName": d.model_volume, "readOnly": True}})
    container = {"name": "engine", "image": plan.image, "args": args, "env": env,
                 "ports": ports, "resources": resources, "volumeMounts": mounts, **probes}
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": d.grace_period,
        # The images run as uid 10001; fsGroup makes mounted volumes writable for it.
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "containers": [container], "volumes": volumes}
    if plan.backend == "tpu":
        spec["nodeSelector"] = tpu_node_selector(plan)
    return {"metadata": {"labels": labels(plan), "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                "prometheus.io/port": str(d.port)}},
            "spec": spec}


def claim_or_empty(claim: str | None) -> dict[str, Any]:
    return {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}


def tpu_node_selector(plan: Plan) -> dict[str, str]:
    """GKE schedules TPU pods by generation and slice topology."""
    gen = (plan.accelerator or "").lower()
    if gen not in GKE_TPU:
        raise ValueError(f"TPU accelerator {plan.accelerator!r} unknown; set deploy "
                         f"accelerator to one of {', '.join(GKE_TPU)}")
    topology = plan.deploy.tpu_topology or default_topology(plan.devices)
    return {"cloud.google.com/gke-tpu-accelerator": GKE_TPU[gen],
            "cloud.google.com/gke-tpu-topology": topology}


def default_topology(chips: int) -> str:
    """The single-host v5e/v6e topology with this many chips."""
    known = {1: "1x1", 4: "2x2", 8: "2x4"}
    if chips not in known:
        raise ValueError(f"a single v5e/v6e host has 1, 4 or 8 chips, not {chips}; set "
                         f"deploy tpu_topology for a larger slice")
    return known[chips]
