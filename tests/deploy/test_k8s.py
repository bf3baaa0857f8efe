"""Every preset's Kubernetes manifests validate against the Kubernetes schemas (offline,
kubernetes-validate) and carry the probes, device requests and grace period a server needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from engine.config import EngineConfig
from tests.deploy.conftest import PRESETS, RESOURCE, backend_of, render_docs

K8S_VERSION = kubernetes_validate.latest_version()


def variants(preset: str) -> dict[str, list[str]]:
    tpu = backend_of(preset) == "tpu"
    scaled = ["--replicas", "3", "--dp", "2", "--cache-volume", "xla-cache",
              "--model-volume", "models", "--model", "/models/m.gguf",
              "--shutdown-timeout", "95", "--startup-timeout", "5000"]
    out = {"default": [], "scaled": scaled + (["--tpu-topology", "2x2"] if tpu else [])}
    if tpu:  # a 16-chip slice: 4 hosts of 4 chips, one copy sharded over all of them
        out["multihost"] = ["--tpu-topology", "4x4", "--tp", "16", "--replicas", "2"]
    return out


CASES = [(p, v) for p in PRESETS for v in variants(p)]


def pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "Job")]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("preset,variant", CASES)
def test_manifests_validate_and_carry_what_a_server_needs(preset: str, variant: str) -> None:
    argv = variants(preset)[variant]
    files = render_docs("--config", preset, "--target", "k8s", *argv)
    (objects,) = files.values()
    for obj in objects:  # raises ValidationError with the path of the bad field
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("Service") >= 1 and kinds.count("ConfigMap") == 1
    assert pods(objects), kinds
    backend = backend_of(preset)
    for obj in pods(objects):
        template = obj["spec"]["template"]
        spec = template["spec"]
        (c,) = spec["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("livenessProbe", "startupProbe"):
            assert probe in c
        startup = c["startupProbe"]
        startup_s = 5000 if variant == "scaled" else 3600  # the flag, else the default
        assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_s
        # SIGTERM drains for --shutdown-timeout; the kubelet must not kill before that.
        assert spec["terminationGracePeriodSeconds"] > float(flag(c["args"], "--shutdown-timeout"))
        assert float(flag(c["args"], "--shutdown-timeout")) == (95 if variant == "scaled" else 30)
        ann = template["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        assert ann["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
        limits = c["resources"].get("limits", {})
        if RESOURCE[backend] is None:
            assert not limits
        else:
            tp = EngineConfig.build(preset).parallel.tensor_parallel_size
            expect = {"default": tp, "scaled": 4 if backend == "tpu" else 2 * tp,
                      "multihost": 4}[variant]  # scaled: --dp 2; TPU: the topology's chips
            assert limits[RESOURCE[backend]] == expect
        if backend == "tpu":
            sel = spec["nodeSelector"]
            assert sel["cloud.google.com/gke-tpu-accelerator"] in (
                "tpu-v5-lite-podslice", "tpu-v6e-slice")
            assert sel["cloud.google.com/gke-tpu-topology"] == {
                "scaled": "2x2", "multihost": "4x4"}.get(variant, "1x1")
        assert spec["securityContext"]["runAsNonRoot"] is True
        if variant == "scaled":
            assert obj["spec"]["replicas"] == 3 and flag(c["args"], "--dp") == "2"
            assert flag(c["args"], "--model") == "/models/m.gguf"
            claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims == {"xla-cache", "models"}
    services = [o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP")
                != "None"]
    (svc,) = services
    pod_labels = pods(objects)[0]["spec"]["template"]["metadata"]["labels"]
    assert {k: v for k, v in svc["spec"]["selector"].items() if k in pod_labels} == pod_labels


@pytest.mark.parametrize("preset", [p for p in PRESETS if backend_of(p) == "tpu"])
def test_multihost_tpu_slice_is_an_indexed_job_wired_for_jax_distributed(preset: str) -> None:
    (objects,) = render_docs("--config", preset, "--target", "k8s",
                             *variants(preset)["multihost"]).values()
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["engine-0", "engine-1"]  # 2 copies
    (headless,) = [o for o in objects if o["kind"] == "Service"
                   and o["spec"].get("clusterIP") == "None"]
    for job in jobs:
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4  # 16 chips / 4
        spec = job["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert spec["subdomain"] == headless["metadata"]["name"]
        host, port = flag(c["args"], "--dist-init-addr").split(":")
        # Pod 0 of this Job, by its stable name under the headless Service.
        assert host == f"{job['metadata']['name']}-0.{headless['metadata']['name']}"
        assert int(port) in [p["containerPort"] for p in c["ports"]]
        assert flag(c["args"], "--nnodes") == "4"
        assert flag(c["args"], "--node-rank") == "$(ENGINE_NODE_RANK)"  # expanded by k8s
        (rank,) = [e for e in c["env"] if e["name"] == "ENGINE_NODE_RANK"]
        assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
        assert c["resources"]["limits"]["google.com/tpu"] == 4
    (svc,) = [o for o in objects if o["kind"] == "Service" and o is not headless]
    assert svc["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"


@pytest.mark.parametrize("preset", PRESETS)
def test_configmap_holds_the_resolved_engine_config(preset: str, tmp_path: Path) -> None:
    (objects,) = render_docs("--config", preset, "--target", "k8s",
                             "--max-running-requests", "8", "--chunked-prefill-size",
                             "64").values()
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    mounted = tmp_path / "config.yaml"
    mounted.write_text(cm["data"]["config.yaml"])
    expect = EngineConfig.build(preset, max_running_requests=8, chunked_prefill_size=64)
    assert EngineConfig.build(mounted) == expect  # what the server reads back


def test_the_validator_rejects_a_broken_deployment() -> None:
    """The schema check above can fail: a wrong type and a missing required field."""
    (objects,) = render_docs("--config", "cpu", "--target", "k8s").values()
    (dep,) = pods(objects)
    dep["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep["spec"]["replicas"] = 1
    del dep["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
