"""The images' entry point and health check, run outside a container (CI has no container
runtime that can run one): what they add to `engine serve` (tested in tests/server) is
listening on all interfaces at $ENGINE_PORT, the health check reading that port, and `exec`,
so that a container stop (SIGTERM) reaches the server and it drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def healthcheck(env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env,
                          capture_output=True, timeout=30).returncode


def test_entrypoint_serves_on_engine_port_and_stops_on_sigterm(default_gguf: Path,
                                                               tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ENGINE_PORT": str(port), "ENGINE_HOST": "127.0.0.1",
           "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert healthcheck(env) == 1  # nothing listens yet
    assert healthcheck({**env, "ENGINE_NODE_RANK": "3"}) == 0  # followers: no HTTP server
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["sh", str(ROOT / "docker" / "entrypoint.sh"), "--backend", "cpu",
             "--max-total-tokens", "1024",
             "--max-running-requests", "4", "--chunked-prefill-size", "64",
             "--shutdown-timeout", "5"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while healthcheck(env) != 0:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # what `docker stop` / the kubelet sends
            assert proc.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log.read_text()
    assert f"http://127.0.0.1:{port}" in text and "server stopped" in text
