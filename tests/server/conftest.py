"""A real `engine serve` process on loopback, per test module, with the default model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
MODEL = "smollm2-135m-instruct"
SMALL = ["--backend", "cpu", "--max-total-tokens", "4096", "--max-running-requests", "8",
         "--chunked-prefill-size", "256", "--log-interval", "2"]
"""Small serving-core settings: a short test run on two CPU cores."""
CAPACITY = 8 + 4
"""Sequences the module's server takes at once: 8 running, 4 queued."""
READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m engine.cli serve ...` (or `python -c PREAMBLE` then the same main)."""

    def __init__(self, log_path: Path, args: list[str], preamble: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = ["serve", *args, "--port", str(self.port)]
        if preamble is None:
            cmd = [sys.executable, "-m", "engine.cli", *argv]
        else:
            main = "import sys\nfrom engine.cli import main\nsys.exit(main(sys.argv[1:]))\n"
            cmd = [sys.executable, "-c", preamble + "\n" + main, *argv]
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines[-n:] if "Dequantizing" not in line)

    def children(self) -> set[int]:
        """Pids of this process's children (none expected; checked on exit)."""
        out: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (task / "children").read_text().split())
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def running_server(tmp_path: Path, args: list[str], preamble: str | None = None,
                   name: str = "server") -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / f"{name}.log", args, preamble)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def sse_events(lines) -> list:
    """Parsed `data:` events up to [DONE] (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line[6:]))
    pytest.fail(f"the stream ended without [DONE] after {events}")


def metrics(http: httpx.Client) -> dict[str, float]:
    """Samples keyed by name plus any labels besides the model's: `engine:x`,
    `engine:y{finished_reason="abort"}`."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            key = name_labels.replace(f'{{model_name="{MODEL}"}}', "")
            out[key.replace(f'model_name="{MODEL}",', "")] = float(value)
    return out


ABORTS = 'engine:request_success_total{finished_reason="abort"}'


def wait_idle(http: httpx.Client, timeout: float = 60.0) -> dict[str, float]:
    """Until nothing runs or waits and no KV page is held (cached prefixes are free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(http)
        if (m["engine:num_requests_running"], m["engine:num_requests_waiting"],
                m["engine:kv_cache_usage_perc"]) == (0, 0, 0):
            return m
        time.sleep(0.2)
    pytest.fail(f"engine not idle after {timeout}s: {m}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: API key, small queue and body limits."""
    args = [*SMALL, "--api-key", API_KEY, "--max-queued-requests", str(CAPACITY - 8),
            "--max-request-bytes", "1000000"]
    with running_server(tmp_path_factory.mktemp("server"), args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
