"""The kernel, and the whole model step, compile for TPU v5e and v6e with the real Mosaic and
XLA:TPU compilers (libtpu, compile-only: no TPU needed, nothing runs).

Interpret mode checks what the kernel computes; this checks that Mosaic accepts it (block
shapes, layouts, DMAs, SMEM use). libtpu, pinned by jax's `tpu` extra, is pip-installed
into the engine cache once and used from a child process, so this process's jax never
loads it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.tpu.aot import KERNEL_CASES, ensure_libtpu

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ensure_libtpu()), str(ROOT)])
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # no lockfile: other libtpu users may be running
    return env


def run(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_kernel_compiles_for_v5e_and_v6e(tpu_env):
    out = run(["-m", "backends.tpu.aot"], tpu_env)
    assert out.count("compiled (") == len(KERNEL_CASES), out


def test_model_step_compiles_for_v5e(tpu_env, tmp_path):
    """The runner's step for a dummy SmolLM2-135M shape (9 query / 3 KV heads, head dim 64,
    30 scanned layers) compiles through engine.precompile for a v5e."""
    out = run(["-m", "engine.precompile", "--backend", "tpu", "--config", "tpu-v5e",
               "--model", "smollm2-135m", "--load-format", "dummy", "--max-total-tokens",
               "8192", "--max-model-len", "1024", "--max-running-requests", "8",
               "--chunked-prefill-size", "64", "--target", "v5e", "--limit", "2",
               "--cache-dir", str(tmp_path)], tpu_env)
    assert "2 programs" in out, out


def test_default_layer_loop_keeps_the_kv_cache_in_place(tpu_env):
    """XLA:TPU's memory plan for the step: with the default (unrolled) layers the per-layer
    caches are updated in place (temporaries a small fraction of the KV cache); under
    lax.scan the stacked cache in the loop carry is copied (several times its size), which
    is why the TPU backend and configs unroll."""
    out = run(["-m", "backends.tpu.aot", "--memory"], tpu_env)
    sizes = {}
    for line in out.splitlines():
        scan, kv, temp = (part.split("=")[1] for part in line.replace(":", "").split())
        sizes[scan] = int(kv), int(temp)
    kv, temp = sizes["False"]
    assert temp < 0.25 * kv, sizes
    kv, temp = sizes["True"]
    assert temp > kv, sizes  # if this starts failing, scan may have become the better default
