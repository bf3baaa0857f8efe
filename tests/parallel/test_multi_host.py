"""Multi-host: two processes on this machine join over loopback (jax.distributed, gloo on
the CPU) and run one model sharded over both processes' devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.parallel.test_tensor_parallel import ROOT, TINY, run_worker
from tests.server.conftest import free_port


def test_two_processes_match_one(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    addr = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_PLATFORMS": "cpu", "ENGINE_TEST_DIST": f"{addr},2,{pid}"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.parallel.tp_worker", str(config), "dummy", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        rows.append(next(json.loads(x) for x in out.splitlines() if x.startswith("{")))
    single = run_worker(str(config), "dummy", [1])[1]
    for row in rows:
        assert row["kv_devices"] == 4  # the mesh spans both processes' two devices
        assert row["wq"] == [None, "tp", None]
        assert row["tokens"] == single["tokens"]
        # Random weights give near-ties that greedy tokens can hide: the logprobs of the
        # chosen tokens must agree too (as in test_tensor_parallel.py).
        for a, b in zip(row["logprobs"], single["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
