"""Engine replicas for `engine serve --dp N`: child `engine serve` processes on loopback.

Each child gets the parent's engine and server options (minus the router's own) and a free
loopback port. The children serve and drain on their own; this module starts them, waits
for their /health, and stops them (SIGTERM, then SIGKILL after a deadline).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time

import httpx

log = logging.getLogger(__name__)

PARENT_ONLY = frozenset({"command", "func", "model_path", "host", "port", "dp",
                         "router_policy"})
"""Options of `engine serve` that are the router's, not the replicas'."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_argv(args: argparse.Namespace, port: int) -> list[str]:
    """`engine serve` options that reproduce `args` for one replica on `port`. Options
    are turned back into flags by their dest name (argparse's default: --a-b for a_b)."""
    argv = ["serve"]
    if args.model_path:
        argv.append(args.model_path)
    for dest, value in sorted(vars(args).items()):
        if dest in PARENT_ONLY or value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return [*argv, "--host", "127.0.0.1", "--port", str(port)]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux), so a killed router
    leaves no orphaned replicas."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Replica:
    def __init__(self, index: int, args: argparse.Namespace) -> None:
        self.index, port = index, free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "engine.cli", *child_argv(args, port)]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(cmd, preexec_fn=preexec)
        log.info("replica %d: pid %d on %s", index, self.proc.pid, self.url)

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_replicas(args: argparse.Namespace, n: int, timeout: float) -> list[Replica]:
    """Start n replicas and wait until every one answers /health with 200; if one exits or
    the deadline passes, stop them all and raise."""
    replicas = [Replica(i, args) for i in range(n)]
    try:
        wait_healthy(replicas, timeout)
    except BaseException:
        stop_replicas(replicas, 10.0)
        raise
    return replicas


def wait_healthy(replicas: list[Replica], timeout: float) -> None:
    deadline, waiting = time.monotonic() + timeout, list(replicas)
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while waiting:
            for r in list(waiting):
                if not r.alive():
                    raise RuntimeError(f"replica {r.index} exited with {r.proc.returncode} "
                                       "before it was ready")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{r.url}/health").status_code == 200:
                        waiting.remove(r)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"replicas {[r.index for r in waiting]} not ready after "
                                   f"{timeout:.0f}s")
            time.sleep(0.25 if waiting else 0)


def stop_replicas(replicas: list[Replica], timeout: float) -> None:
    """SIGTERM all (each drains its in-flight requests), then SIGKILL what is left."""
    for r in replicas:
        if r.alive():
            r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for r in replicas:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("replica %d did not stop in %.0fs: killing it", r.index, timeout)
            r.proc.kill()
            r.proc.wait()
