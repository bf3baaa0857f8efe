"""`engine deploy`: CLI > the config's deploy: section > defaults; files written or printed;
bad input gets one actionable line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.cli import main
from tests.deploy.conftest import render_docs, write_yaml


def deployment(*argv: str) -> dict:
    (objects,) = render_docs(*argv, "--target", "k8s").values()
    (dep,) = [o for o in objects if o["kind"] == "Deployment"]
    return dep


def test_precedence_cli_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "gpu.yaml", {
        "backend": {"name": "cuda"}, "parallel": {"tensor_parallel_size": 2},
        "deploy": {"replicas": 2, "memory": "40Gi", "image": "reg.example/engine:cuda-1"}})
    dep = deployment("--config", str(cfg), "--replicas", "5")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert dep["spec"]["replicas"] == 5  # CLI
    assert c["resources"]["requests"]["memory"] == "40Gi"  # file
    assert c["image"] == "reg.example/engine:cuda-1"  # file
    assert c["resources"]["requests"]["cpu"] == "4"  # default
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2  # the file's tensor parallelism
    assert c["ports"][0]["containerPort"] == 30000  # default
    dep = deployment("--config", str(cfg), "--tp", "4", "--port", "8000")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4  # engine options too
    assert c["ports"][0]["containerPort"] == 8000
    assert {"name": "ENGINE_PORT", "value": "8000"} in c["env"]


def test_the_deploy_section_does_not_disturb_the_engine(tmp_path: Path) -> None:
    from engine.config import EngineConfig

    cfg = write_yaml(tmp_path / "c.yaml", {"backend": {"name": "cpu"},
                                           "cache": {"page_size": 32},
                                           "deploy": {"replicas": 2}})
    assert EngineConfig.build(cfg).cache.page_size == 32


def test_output_folder_gets_the_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["deploy", "--config", "tpu-v6e", "--target", "compose", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["engine.compose.yaml", "engine.engine.yaml"]
    compose = yaml.safe_load((out / "engine.compose.yaml").read_text())
    assert compose["services"]["engine"]["image"] == "engine:tpu"
    assert main(["deploy", "--config", "tpu-v6e", "--target", "k8s", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# engine.k8s.yaml\n")
    kinds = [d["kind"] for d in yaml.safe_load_all(printed.split("\n", 1)[1])]
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    assert "&id" not in printed  # no YAML anchors in what people read


@pytest.mark.parametrize("argv,message", [
    (["--config", "cpu", "--gpus", "2"], None),  # argparse: unknown flag, exit 2
    (["--config", "{tmp}/bad.yaml"], "unknown deploy key(s) replica"),
    (["--config", "{tmp}/auto.yaml"], "needs a backend"),
    (["--config", "cuda", "--tp", "4", "--accelerators", "2"], "needs 4 devices"),
    (["--config", "tpu-v6e", "--tpu-topology", "4x4"], "tensor_parallel_size=1 must be 16"),
    (["--config", "cpu", "--tpu-topology", "2x2"], "needs the tpu backend"),
    (["--config", "cpu", "--name", "My_Engine"], "DNS label"),
    (["--config", "cpu", "--backend", "metal"], "does not know backend 'metal'"),
    (["--config", "no-such-preset"], "not found"),
    ([], "needs --config"),
])
def test_bad_input_is_one_actionable_line(argv: list[str], message: str | None, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    write_yaml(tmp_path / "bad.yaml", {"backend": {"name": "cpu"}, "deploy": {"replica": 2}})
    write_yaml(tmp_path / "auto.yaml", {"cache": {"page_size": 16}})
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(["deploy", "--target", "k8s", "--dry-run", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    if message is not None:
        assert err.startswith("engine: error:") and message in err, err
        assert err.count("\n") == 1
