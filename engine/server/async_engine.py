"""The engine on its own thread, and the asyncio side that talks to it.

One thread owns the Engine: it alone calls add_request / step / abort and reads the
scheduler. The event loop sends it commands through a thread-safe queue; it answers with
`loop.call_soon_threadsafe`, carrying immutable deltas (the engine's RequestOutputs are
cumulative and mutated in place, so they never cross threads). Tokenization and chat
templates run on the HTTP side; the only text work here is the engine's incremental
detokenization, which stop strings need.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.core.scheduler import SchedulerStats
from engine.engine import Engine
from engine.memory import MemoryReleasedError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.metrics import ServerMetrics
from engine.server.requests import ChoiceDelta, Delta, EngineDeadError, QueueFullError, RequestGroup

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
"""How long the idle engine thread waits for a command before checking its timers."""


@dataclasses.dataclass
class _Track:
    """Engine-thread bookkeeping of one engine request: what its consumer has been sent."""

    group: RequestGroup
    index: int
    sent: list[list[int]]  # per choice: [text chars, tokens, finish sent (0/1)]
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics,
                 *, max_queued_requests: int | None = None, log_interval: float = 10.0,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.loop, self.metrics, self.on_death = loop, metrics, on_death
        self._engine = engine
        running = engine.scheduler.config.max_running_requests
        self.capacity = None if max_queued_requests is None else running + max_queued_requests
        """Sequences running or queued at once (None: no limit)."""
        self._inflight = 0  # event-loop side: sequences of open groups
        self._cmds: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.dead = False
        self.stats: SchedulerStats = engine.scheduler.stats()
        """Snapshot taken by the engine thread after every step (read it, never the engine)."""
        self.step_compiles: int = engine.runner.serving_compiles
        """Step programs compiled while serving, as of that snapshot."""
        # Engine-thread state.
        self._tracks: dict[str, _Track] = {}
        self._groups: dict[str, RequestGroup] = {}
        self._log_interval = log_interval
        self._log_at, self._log_gen, self._log_computed = time.monotonic(), 0, 0
        # A weight swap waiting for running requests to finish, and the requests that came
        # meanwhile (admitted after the swap, on the new weights).
        self._swap: tuple[Any, str | None, asyncio.Future] | None = None
        self._held: list[RequestGroup] = []
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- event-loop side -----------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine; only its own thread may step it."""
        return self._engine

    @property
    def swap_pending(self) -> bool:
        """A weight swap waits for the running requests (new ones are held meanwhile)."""
        return self._swap is not None

    def start(self) -> None:
        self.thread.start()

    async def submit(self, gid: str, prompts: list[list[int]], params: SamplingParams,
                     arrival: float | None = None) -> RequestGroup:
        """Queue one request per prompt; returns once the engine accepted all of them.
        Raises ValueError (the engine's validation), QueueFullError or EngineDeadError."""
        self._check_alive()
        group = RequestGroup(self.loop, gid, prompts, params, arrival or time.monotonic(),
                             self._release)
        if self.capacity is not None and self._inflight + group.size > self.capacity:
            raise QueueFullError(f"the server is at capacity ({self.capacity} sequences running "
                                 "or queued); retry later")
        self._inflight += group.size
        self._send("add", group)
        try:
            if self.dead:  # died after the check: nobody may read the command
                group._fail(EngineDeadError("the engine is not running"))
            await group.accepted
        except BaseException:
            group.close()
            raise
        return group

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread, between steps."""
        self._check_alive()
        fut = self.loop.create_future()
        self._send("call", (fn, fut))
        if self.dead:
            _resolve(fut, None, EngineDeadError("the engine is not running"))
        return await fut

    async def swap_weights(self, params: Any, abort_running: bool,
                           version: str | None) -> str:
        """Serve `params` from a step boundary on: new requests are held, running ones
        finish on the old weights (or are aborted), then the weights are swapped and the
        prefix cache flushed. Returns the new weight version."""
        self._check_alive()
        fut = self.loop.create_future()
        self._send("swap", (params, abort_running, version, fut))
        if self.dead:
            _resolve(fut, None, EngineDeadError("the engine is not running"))
        return await fut

    def abort(self, gid: str) -> None:
        """Abort a request by id; its consumer gets finish_reason 'abort'. Any thread."""
        self._send("abort", (gid, True))

    def abort_all(self) -> None:
        """Abort every request (the drain deadline). Any thread."""
        self._send("abort_all", None)

    def stop(self, timeout: float) -> bool:
        """Abort everything and end the thread; False if it did not end in time."""
        self._send("stop", None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError("the engine is not running")

    def _send(self, kind: str, arg: Any) -> None:
        self._cmds.put((kind, arg))

    def _release(self, group: RequestGroup, abort: bool) -> None:
        self._inflight -= group.size
        if abort:
            self._send("abort", (group, False))

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        _name_os_thread(b"engine-loop")
        try:
            while self._serve_commands():
                # Published before the step too: a step can take seconds (a compile), and
                # meanwhile /metrics must count the requests just added or aborted.
                self.stats = self._engine.scheduler.stats()
                if self._engine.has_unfinished():
                    self._deliver(self._engine.step())
                self.stats = self._engine.scheduler.stats()
                self.step_compiles = self._engine.runner.serving_compiles
                self._maybe_log()
                self._maybe_swap()
        except Exception as e:
            self._die(e)

    def _serve_commands(self) -> bool:
        """Apply queued commands (waiting for one while idle); False on stop."""
        block = not self._engine.has_unfinished()
        while True:
            try:
                kind, arg = self._cmds.get(timeout=IDLE_POLL_S) if block else \
                    self._cmds.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self._abort_all()
                return False
            self._handlers[kind](self, arg)

    def _on_add(self, group: RequestGroup) -> None:
        if self._swap is not None:  # admitted once the new weights serve
            self._held.append(group)
            return
        added: list[str] = []
        try:
            for eid, ids in zip(group.engine_ids, group.prompts, strict=True):
                self._engine.add_request(ids, group.params, request_id=eid)
                added.append(eid)
        except Exception as e:  # ValueError: the client's (400); anything else: a bug (500)
            if not isinstance(e, (ValueError, MemoryReleasedError)):
                log.exception("add_request failed")
            for eid in added:
                self._engine.abort(eid)
            self._post(group._fail, e)
            return
        for i, eid in enumerate(group.engine_ids):
            self._tracks[eid] = _Track(group, i, [[0, 0, 0] for _ in range(group.params.n)])
        self._groups[group.gid] = group
        self.metrics.add_prompt_tokens(sum(len(p) for p in group.prompts))
        self._post(group._accept)

    def _on_abort(self, arg: tuple[RequestGroup | str, bool]) -> None:
        target, notify = arg
        gid = target if isinstance(target, str) else target.gid
        for held in [g for g in self._held if g.gid == gid]:  # not admitted yet (a swap)
            self._held.remove(held)
            if notify:
                self._post(held._fail, EngineDeadError("aborted before it was admitted"))
            return
        group = self._groups.get(gid)
        if group is None or (group is not target and not isinstance(target, str)):
            return
        del self._groups[gid]
        now, deltas, itl, new_tokens = time.monotonic(), [], [], 0
        for eid in group.engine_ids:
            out, track = self._engine.abort(eid), self._tracks.pop(eid, None)
            if out is not None and track is not None:  # counted in the metrics either way
                delta, n = self._delta(track, out, now, itl)
                deltas.append((group, delta))
                new_tokens += n
        self._count_tokens(new_tokens, itl)
        if notify and deltas:
            self._post(_put_all, deltas)

    def _on_abort_all(self, _: None) -> None:
        self._abort_all()

    def _abort_all(self) -> None:
        for gid in [g.gid for g in self._held] + list(self._groups):
            self._on_abort((gid, True))

    def _on_call(self, arg: tuple[Callable[[Engine], Any], asyncio.Future]) -> None:
        fn, fut = arg
        try:
            self._post(_resolve, fut, fn(self._engine), None)
        except Exception as e:
            self._post(_resolve, fut, None, e)

    def _on_swap(self, arg: tuple[Any, bool, str | None, asyncio.Future]) -> None:
        params, abort_running, version, fut = arg
        if self._swap is not None:  # the HTTP side serializes updates; never two at once
            self._post(_resolve, fut, None, RuntimeError("a weight swap is already pending"))
            return
        if abort_running:
            self._abort_all()
        self._swap = (params, version, fut)
        self._maybe_swap()

    def _maybe_swap(self) -> None:
        """The pending swap, once no request runs (a step boundary); then the held adds."""
        if self._swap is None or self._engine.has_unfinished():
            return
        from engine.weights_update import swap

        (params, version, fut), self._swap = self._swap, None
        try:
            self._post(_resolve, fut, swap(self._engine, params, version), None)
        except Exception as e:
            self._post(_resolve, fut, None, e)
        held, self._held = self._held, []
        for group in held:
            self._on_add(group)

    _handlers: dict[str, Callable[[AsyncEngine, Any], None]] = {
        "add": _on_add, "abort": _on_abort, "abort_all": _on_abort_all, "call": _on_call,
        "swap": _on_swap}

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now, deltas, itl, new_tokens = time.monotonic(), [], [], 0
        tracks = self._tracks
        for out in outputs:
            track = tracks.get(out.request_id)
            if track is None:
                continue
            delta, n = self._delta(track, out, now, itl)
            deltas.append((track.group, delta))
            new_tokens += n
            if delta.finished:
                del tracks[out.request_id]
                group = track.group
                if not any(eid in tracks for eid in group.engine_ids):
                    self._groups.pop(group.gid, None)
        self._count_tokens(new_tokens, itl)
        if deltas:
            self._post(_put_all, deltas)

    def _count_tokens(self, new_tokens: int, itl: list[float]) -> None:
        """A step's generated tokens and inter-token latencies into the metrics: once per
        step, not per stream (each takes the metrics' lock)."""
        if new_tokens:
            self.metrics.add_generation_tokens(new_tokens)
            self._log_gen += new_tokens
        if itl:
            self.metrics.itl.observe_many(itl)

    def _delta(self, track: _Track, out: RequestOutput, now: float,
               itl: list[float]) -> tuple[Delta, int]:
        """What `out` produced since the track's last delta, and how many tokens; the
        inter-token latency, if it produced any after its first, is appended to `itl`
        (for _count_tokens)."""
        choices, new_tokens = [], 0
        for c in out.outputs:
            sent = track.sent[c.index]
            num_tokens, reason = len(c.token_ids), c.finish_reason
            if sent[2] or (num_tokens == sent[1] and reason is None):
                continue
            toks = c.token_ids[sent[1]:]
            lps = c.logprobs[sent[1]:] if c.logprobs is not None else None
            text = c.text
            choices.append(ChoiceDelta(c.index, text[sent[0]:], toks, lps, reason,
                                       c.stop_reason))
            new_tokens += num_tokens - sent[1]
            sent[0], sent[1], sent[2] = len(text), num_tokens, reason is not None
            if reason is not None:
                self.metrics.request_finished(reason)
        if new_tokens:
            if track.last_token is None:
                self.metrics.ttft.observe(now - track.group.arrival)
            else:
                itl.append(now - track.last_token)
            track.last_token = now
        finished = out.finished
        if finished:
            self.metrics.e2e.observe(now - track.group.arrival)
        return Delta(track.index, len(out.prompt_token_ids), out.num_cached_tokens, choices,
                     finished, out.prompt_logprobs), new_tokens

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def _die(self, exc: BaseException) -> None:
        log.critical("the engine loop died: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self.dead = True  # before draining: a submit that misses the drain sees it
        if self.on_death is not None:  # first: a client told of a failed request that then
            self.on_death(exc)  # asks /health must find the failure already recorded
        err = EngineDeadError(f"the engine died ({type(exc).__name__}: {exc})")
        for group in [*self._groups.values(), *self._held]:
            self._post(group._fail, err)
        self._groups.clear()
        self._held.clear()
        if self._swap is not None:
            self._post(_resolve, self._swap[2], None, err)
            self._swap = None
        self._tracks.clear()
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._post(arg._fail, err)
            elif kind in ("call", "swap"):
                self._post(_resolve, arg[-1], None, err)

    def _maybe_log(self) -> None:
        """One status line every log_interval seconds while there is anything to say."""
        now = time.monotonic()
        dt = now - self._log_at
        if self._log_interval <= 0 or dt < self._log_interval:
            return
        s = self.stats
        prefill = max(0, s.num_computed_tokens - self._log_computed - self._log_gen)
        if s.num_running or s.num_waiting or self._log_gen or prefill:
            log.info("running: %d reqs, waiting: %d reqs, KV cache usage: %.1f%%, prefix cache "
                     "hit rate: %.1f%%, prompt throughput: %.1f tokens/s, generation "
                     "throughput: %.1f tokens/s", s.num_running, s.num_waiting,
                     100 * s.kv_usage, 100 * s.prefix_hit_rate, prefill / dt, self._log_gen / dt)
        self._log_at, self._log_gen, self._log_computed = now, 0, s.num_computed_tokens


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread its name at the OS level too (Linux; at most 15 bytes), so
    that per-thread CPU time in /proc, top -H and perf tell the engine loop apart from the
    event loop and XLA's pools (Python 3.11 names only its own Thread objects)."""
    try:
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name is only cosmetic
        pass


def _put_all(deltas: list[tuple[RequestGroup, Delta]]) -> None:
    for group, delta in deltas:
        if not group._closed:
            group._queue.put_nowait(delta)


def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)
