"""The images' one Dockerfile, parsed (dockerfile-parse) for each backend: a pinned vendor base
stage, the backend's extra, a non-root user, `engine serve` behind the entry point, a health
check, the cache as a volume, no model inside; and `make image` passes the backend."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
BASES = {"cpu": "python:", "tpu": "python:", "cuda": "nvidia/cuda:", "rocm": "rocm/",
         "npu": "quay.io/ascend/cann:"}
"""Each backend's vendor-maintained base (plain Python for CPU and TPU)."""


def instructions(df: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in df.structure if i["instruction"] == name]


def parse(backend: str) -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "docker" / "Dockerfile"),
                            build_args={"BACKEND": backend})


def stage_images(df: DockerfileParser) -> dict[str, str]:
    """Stage name -> its base image (ARG defaults substituted), for `FROM image AS name`."""
    froms = [v.split() for v in instructions(df, "FROM")]
    return {f[2]: image for f, image in zip(froms, df.parent_images, strict=True)
            if len(f) == 3 and f[1].upper() == "AS"}


@pytest.mark.parametrize("backend", sorted(BASES))
def test_dockerfile(backend: str) -> None:
    df = parse(backend)
    assert df.baseimage == f"base-{backend}"  # the last stage builds on the backend's
    base = stage_images(df)[f"base-{backend}"]
    assert base.startswith(BASES[backend]), base
    name, _, tag = base.rpartition(":")
    assert name and re.search(r"\d+\.\d+", tag) and "latest" not in tag, base  # pinned
    assert df.args["EXTRAS"] == "${BACKEND}" and df.args["BACKEND"] == backend
    (install,) = [r for r in instructions(df, "RUN") if "pip install" in r]
    assert '".[${EXTRAS}]"' in install
    users = instructions(df, "USER")
    assert users and users[-1] not in ("root", "0")
    assert any(f"--uid {users[-1]}" in r for r in instructions(df, "RUN"))
    (entry,) = instructions(df, "ENTRYPOINT")
    (script,) = json.loads(entry)
    copies = dict(reversed(c.split()) for c in instructions(df, "COPY") if len(c.split()) == 2)
    assert "exec engine serve" in (ROOT / copies[f"/usr/local/bin/{script}"]).read_text()
    (health,) = instructions(df, "HEALTHCHECK")
    checker = json.loads(health.split("CMD", 1)[1])[0]
    assert "/health" in (ROOT / copies[f"/usr/local/bin/{checker}"]).read_text()
    cache = df.envs["ENGINE_CACHE_DIR"]
    assert cache in json.loads(instructions(df, "VOLUME")[0])
    assert instructions(df, "EXPOSE") == [df.envs["ENGINE_PORT"]]
    text = "\n".join(i["value"] for i in df.structure if i["instruction"] != "COMMENT")
    assert not re.search(r"\.(gguf|safetensors)\b|engine\.loader\.hub|fetch_model", text), \
        "a model is mounted or downloaded at run time, never baked into the image"
    assert not instructions(df, "ADD")


def test_dockerignore_admits_only_what_the_images_copy() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for c in instructions(parse("cpu"), "COPY"):
        copied.update(c.split()[:-1])
    assert copied == allowed


def test_backend_extras_and_make_image() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; we run on 3.10)
    extras = set(re.findall(r"^([a-z0-9-]+) = \[", pyproject.split(
        "[project.optional-dependencies]")[1].split("\n[")[0], re.M))
    assert {"cpu", "cuda", "tpu"} <= extras  # rocm and npu: with their backends
    # --no-print-directory: under `make test` this make is nested and would name its folder.
    out = subprocess.run(["make", "--no-print-directory", "-n", "image", "BACKEND=rocm"],
                         cwd=ROOT, text=True, capture_output=True, check=True).stdout
    assert out.split() == ["docker", "build", "-f", "docker/Dockerfile", "--build-arg",
                           "BACKEND=rocm", "-t", "engine:rocm", "."]


def test_every_backend_has_a_base_stage() -> None:
    stages = stage_images(parse("cpu"))
    assert set(stages) == {f"base-{b}" for b in BASES}
