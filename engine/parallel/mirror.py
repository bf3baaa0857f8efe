"""Multi-host serving: process 0 (the leader) schedules and serves; every step it launches
is replayed by the other processes (followers), so that all of them run each SPMD program
together, in the same order, on the same inputs.

The leader listens on a port the OS picks, publishes it in jax.distributed's key-value
store, and sends each step's host inputs (numpy arrays and plain dataclasses, pickled) to
every follower; a follower runs only the device
side (ModelRunner.replay) until the leader closes the connection. Step outputs are
replicated, so reading them on the leader needs no collective the followers would miss.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from engine.config import ParallelOptions

log = logging.getLogger(__name__)

AUTHKEY = b"engine-steps"
"""Guards against stray connections, not attackers: the step channel belongs on the
cluster's private network, like jax.distributed's own."""
CONNECT_TIMEOUT_S = 600.0
PORT_KEY = "engine/step_port"
"""The step channel's port in jax.distributed's key-value store. A fixed port (the
coordinator's + 1, as before 2026-12-04) could already be some outgoing connection's
local port, and the leader then failed to bind."""


def _kv_store() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


def step_address(opts: ParallelOptions) -> tuple[str, int]:
    """The leader's step channel: the coordinator's host and the port the leader published."""
    host = opts.coordinator_address.rsplit(":", 1)[0]  # type: ignore[union-attr]
    port = _kv_store().blocking_key_value_get(PORT_KEY, int(CONNECT_TIMEOUT_S * 1000))
    return host, int(port)


class StepMirror:
    """The leader's side: one connection per follower."""

    def __init__(self, opts: ParallelOptions) -> None:
        with Listener(("0.0.0.0", 0), authkey=AUTHKEY) as listener:
            port = listener.address[1]
            _kv_store().key_value_set(PORT_KEY, str(port))
            self.conns: list[Connection] = [listener.accept()
                                            for _ in range(opts.num_processes - 1)]
        log.info("step mirror: %d followers connected on port %d", len(self.conns), port)

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass


def follow(runner: Any, opts: ParallelOptions) -> int:
    """A follower's life after building its engine: replay the leader's steps until it
    closes the channel. Returns the exit status."""
    try:
        address = step_address(opts)
    except Exception as e:  # jax raises its runtime error when the wait times out
        log.error("the leader published no step channel within %.0fs: %s", CONNECT_TIMEOUT_S, e)
        return 1
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            conn = Client(address, authkey=AUTHKEY)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                log.error("no leader at %s:%d after %.0fs", *address, CONNECT_TIMEOUT_S)
                return 1
            time.sleep(0.5)
    log.info("following the leader at %s:%d", *address)
    prev = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            log.warning("the leader closed the step channel")
            return 0
        if msg is None:
            return 0
        prev = runner.replay(msg, prev)
