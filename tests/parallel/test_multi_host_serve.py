"""Multi-host serving: process 0 serves HTTP and schedules; process 1 replays its steps.
Two processes on this machine over loopback, 2 CPU devices each, one TP-4 model."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from engine import SamplingParams
from tests.parallel.test_tensor_parallel import ROOT
from tests.server.conftest import SMALL, ServerProcess, free_port

PROMPTS = ["The capital of France is", "def add(a, b):"]


def test_leader_serves_and_follower_replays(tmp_path, monkeypatch, float32_llm):
    addr = f"127.0.0.1:{free_port()}"
    dist = ["--tp", "4", "--dist-init-addr", addr, "--nnodes", "2"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    follower_log = tmp_path / "follower.log"
    with open(follower_log, "wb") as sink:  # a file, not a pipe nobody reads until the end
        follower = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", *SMALL, *dist, "--node-rank", "1"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    leader = ServerProcess(tmp_path / "leader.log", [*SMALL, *dist, "--node-rank", "0"])
    try:
        leader.wait_ready()
        want = float32_llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
        for prompt, ref in zip(PROMPTS, want, strict=True):
            r = httpx.post(f"{leader.url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ref.outputs[0].text
    finally:
        leader.stop()
        follower.wait(timeout=120)
    out = follower_log.read_text(errors="replace")
    assert leader.proc.returncode == 0, leader.log_tail()
    assert follower.returncode == 0, out[-3000:]
    assert "following the leader" in out
