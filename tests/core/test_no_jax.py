"""The scheduler, page pool and radix cache know no hardware: no jax, nothing from backends/."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = ["engine.core.scheduler", "engine.core.page_pool", "engine.core.radix_cache"]
FORBIDDEN = ("jax", "jaxlib", "backends")


def test_importing_the_core_loads_no_jax_and_no_backend() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("module", MODULES)
def test_source_imports_no_jax_and_no_backend(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
    assert imported, "the parse found no imports at all"
    assert not [m for m in imported if m.lstrip(".").split(".")[0] in FORBIDDEN]
    assert not [m for m in imported if m.startswith(".")], "relative imports hide the origin"
