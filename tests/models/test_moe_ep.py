"""Expert parallelism on 8 forced CPU devices: with the experts split 2, 4 and 8 ways over a
mesh axis, the jitted model gives the unsharded logits (float32).

The cases run in one subprocess (tests/models/moe_ep_worker.py), because the device count
is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ep_runs() -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.models.moe_ep_worker", "qwen3_moe:scan",
         "mixtral:unrolled"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_case_ran(ep_runs):
    cases = {(r["arch"], r["mode"], r["ep"]) for r in ep_runs}
    assert cases == {(a, m, ep) for a in ("qwen3_moe", "mixtral")
                     for m in ("gspmd", "shard_map", "expert_mlp") for ep in (2, 4, 8)}


@pytest.mark.parametrize("mode", ["gspmd", "shard_map", "expert_mlp"])
def test_sharded_experts_give_unsharded_logits(ep_runs, mode):
    for r in (r for r in ep_runs if r["mode"] == mode):
        assert r["scale"] > 0.1, r  # logits of a real size: the comparison means something
        assert r["err"] < 1e-5, r


def test_experts_are_split_not_gathered(ep_runs):
    """Each device holds X/ep experts (or F/ep of each expert's width), and the shard_map
    path moves no expert weights (no float all-gather in the compiled program)."""
    for r in ep_runs:
        shape = r["shard_shape"][1:] if r["scan"] else r["shard_shape"]  # drop the layer axis
        want = [8 // r["ep"], 64, 32] if r["mode"] != "expert_mlp" else [8, 64, 32 // r["ep"]]
        assert shape == want, r
        if r["mode"] == "shard_map":
            assert not [d for d in r["gather_dtypes"] if d.startswith(("f", "bf"))], r
