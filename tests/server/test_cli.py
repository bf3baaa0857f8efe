"""FastAPI, uvicorn and pydantic stay inside engine/server: the offline engine, the CLI's
other commands and the benchmarks run where they are not installed."""

import ast
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "uvicorn", "pydantic", "starlette")


def test_cli_registers_serve_without_importing_the_server_stack() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_ONLY!r}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from engine.cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--max-queued-requests" in out.stdout and "--api-key" in out.stdout


def test_no_module_outside_engine_server_imports_the_server_stack() -> None:
    offenders = []
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("backends/**/*.py")]:
        if "server" in path.relative_to(ROOT).parts[:2]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in SERVER_ONLY]
    assert not offenders


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="a TPU is present")
@pytest.mark.parametrize("dp", ["1", "2"])
def test_serve_without_the_hardware_exits_before_serving(dp, monkeypatch, capsys) -> None:
    pytest.importorskip("uvicorn")
    import engine.server.cli
    import engine.server.router
    from engine.cli import main

    def serving(*args):
        pytest.fail("the server started without the backend's hardware")

    monkeypatch.setattr(engine.server.cli, "serve", serving)
    monkeypatch.setattr(engine.server.router, "serve_dp", serving)
    code = main(["serve", "--backend", "tpu", "--port", "0", "--dp", dp])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("engine: error:")]
    assert code == 2 and len(errors) == 1 and "no TPU found" in errors[0], errors
