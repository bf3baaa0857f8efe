"""Rendering deployments the way `engine deploy --dry-run` does, for every preset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from engine.config import CONFIG_DIR, load_yaml
from engine.deploy.cli import register_deploy, render

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
"""Every preset in configs/, found by globbing: presets added later are covered too."""
RESOURCE = {"cpu": None, "cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu",
            "tpu": "google.com/tpu", "npu": "huawei.com/Ascend910"}
"""The Kubernetes device resource each backend must ask for."""


def backend_of(preset: str) -> str:
    return load_yaml(preset)["backend"]["name"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_deploy(parser.add_subparsers())
    return parser.parse_args(["deploy", *argv])


def render_docs(*argv: str) -> dict[str, list[dict[str, Any]]]:
    """{file name: its YAML documents} of `engine deploy ARGV --dry-run`."""
    files = render(parse(*argv, "--dry-run"))
    return {name: list(yaml.safe_load_all(text)) for name, text in files.items()}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
