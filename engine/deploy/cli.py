"""`engine deploy --config PRESET --target k8s|skypilot|compose [-o DIR | --dry-run]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from engine.options import add_engine_args, engine_options

Renderer = Callable[[Any], dict[str, Any]]


def targets() -> dict[str, Renderer]:
    from engine.deploy import compose, k8s, skypilot

    return {"k8s": k8s.render, "skypilot": skypilot.render, "compose": compose.render}


# Deploy keys settable on the command line: (flag, DeployOptions field, type).
DEPLOY_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--name", "name", str), ("--image", "image", str), ("--replicas", "replicas", int),
    ("--dp", "dp", int), ("--port", "port", int), ("--accelerator", "accelerator", str),
    ("--accelerators", "accelerators", int), ("--tpu-topology", "tpu_topology", str),
    ("--cpu", "cpu", str), ("--memory", "memory", str),
    ("--cache-volume", "cache_volume", str), ("--model-volume", "model_volume", str),
    ("--shutdown-timeout", "shutdown_timeout", float),
    ("--startup-timeout", "startup_timeout", int),
)


def register_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="render a deployment (Kubernetes, SkyPilot, compose) "
                       "from a device config",
                       description="Render a deployment from a device config: its engine "
                       "sections become the server's --config, its deploy: section says how "
                       "it runs. Precedence: CLI > the config file > defaults (docs/deploy.md).")
    add_engine_args(p)
    p.add_argument("--target", required=True, choices=["k8s", "skypilot", "compose"])
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", type=Path, help="folder to write the files into")
    out.add_argument("--dry-run", action="store_true", help="print the files instead")
    for flag, dest, typ in DEPLOY_FLAGS:
        p.add_argument(flag, dest=f"deploy_{dest}", type=typ, default=None, metavar=dest.upper(),
                       help=f"deploy key {dest} (overrides the config's deploy: section)")
    p.set_defaults(func=cmd_deploy)


def render(args: argparse.Namespace) -> dict[str, str]:
    """{file name: YAML text} for the target, from the config and the flags."""
    from engine.config import EngineConfig, load_yaml
    from engine.deploy.options import DeployOptions
    from engine.deploy.plan import make_plan

    if args.config is None:
        raise ValueError("engine deploy needs --config: a preset name in configs/ (cpu, "
                         "cuda, tpu-v6e, ...) or a YAML file")
    section = load_yaml(args.config).get("deploy")
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{args.config}: the deploy section must be a mapping of keys")
    deploy = DeployOptions.build(section, **{dest: getattr(args, f"deploy_{dest}")
                                             for _, dest, _ in DEPLOY_FLAGS})
    config = EngineConfig.build(args.config, model=args.model,
                                backend=None if args.backend == "auto" else args.backend,
                                **engine_options(args))
    files = targets()[args.target](make_plan(config, deploy))
    return {name: dump(content) for name, content in files.items()}


class Dumper(yaml.SafeDumper):
    """Plain YAML for people and every parser: no anchors/aliases for dicts the renderers
    share, and multi-line strings (a config file in a ConfigMap, a script) as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


Dumper.add_representer(str, _str)


def dump(content: dict[str, Any] | list[dict[str, Any]]) -> str:
    docs = content if isinstance(content, list) else [content]  # k8s: one document an object
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False)


def cmd_deploy(args: argparse.Namespace) -> int:
    files = render(args)
    if args.dry_run:
        for name, text in files.items():
            print(f"# {name}\n{text}", end="" if text.endswith("\n") else "\n")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.output / name).write_text(text)
        print(args.output / name, file=sys.stderr)
    return 0
