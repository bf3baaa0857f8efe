"""Release and take back the engine's device memory (`/release_memory_occupation`), so that
a trainer on the same devices can use it between rollouts.

Tags: "kv_cache" deletes the KV pool's arrays (its pages' contents are gone: the prefix
cache is flushed); "weights" copies the params to the host and deletes their device arrays
(resume puts the host copy back on the same shardings). While anything is released the
engine takes no requests (MemoryReleasedError).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax

TAGS = ("kv_cache", "weights")


class MemoryReleasedError(RuntimeError):
    """A request came while the engine's memory is released (resume it first)."""


def device_bytes(devices: Iterable[Any]) -> int:
    """Bytes in use on `devices`: the allocator's count (jax memory_stats) where the
    platform keeps one, else the bytes of every live jax array on them (the CPU)."""
    devices = list(devices)
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_in_use" in s for s in stats):
        return sum(s["bytes_in_use"] for s in stats)
    # Counted by buffer: arrays that alias one (a committed put of an uncommitted array, a
    # sharded array's per-device views) would otherwise count twice.
    mine, buffers = set(devices), {}
    for a in jax.live_arrays():
        if a.is_deleted():
            continue
        for shard in a.addressable_shards:
            if shard.device in mine:
                data = shard.data
                buffers[shard.device.id, data.unsafe_buffer_pointer()] = data.nbytes
    return sum(buffers.values())


def check_tags(tags: Any) -> tuple[str, ...]:
    """The tags asked for (None: all), or ValueError naming the unknown one."""
    if tags is None:
        return TAGS
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"tags must be a list of strings among {list(TAGS)}, got {tags!r}")
    for t in tags:
        if t not in TAGS:
            raise ValueError(f"unknown memory tag {t!r}; known: {', '.join(TAGS)}")
    return tuple(dict.fromkeys(tags))


def _delete(tree: Any) -> None:
    for a in jax.tree.leaves(tree):
        a.delete()


def release(engine: Any, tags: Any = None) -> int:
    """Free the tagged memory (idle engine only); returns the device bytes freed."""
    tags = check_tags(tags)
    if engine.has_unfinished() or engine.scheduler.has_work():
        raise ValueError("requests are running: release memory once the engine is idle")
    runner = engine.runner
    if runner.mirror is not None:
        raise ValueError("releasing memory is single-process only: the followers of a "
                         "multi-host server would keep theirs")
    devices = runner.backend.model_devices()
    jax.block_until_ready(runner.kv)  # a step may still write it
    before = device_bytes(devices)
    if "kv_cache" in tags and "kv_cache" not in engine.memory_released:
        engine.scheduler.flush_cache()  # cached pages would name K/V that are gone
        _delete(runner.kv)
        runner.kv = None
        engine.memory_released.add("kv_cache")
    if "weights" in tags and "weights" not in engine.memory_released:
        params = runner.params
        shardings = jax.tree.map(lambda a: a.sharding, params)
        runner.released_params = (jax.device_get(params), shardings)  # host copy
        _delete(params)
        runner.params = None
        engine.memory_released.add("weights")
    return before - device_bytes(devices)


def resume(engine: Any, tags: Any = None) -> int:
    """Take the tagged memory back; returns the device bytes taken."""
    tags = check_tags(tags)
    runner = engine.runner
    devices = runner.backend.model_devices()
    before = device_bytes(devices)
    if "weights" in tags and "weights" in engine.memory_released:
        host, shardings = runner.released_params
        runner.params = jax.device_put(host, shardings)
        runner.released_params = None
        engine.memory_released.discard("weights")
    if "kv_cache" in tags and "kv_cache" in engine.memory_released:
        runner.kv = runner.allocate_kv()
        engine.memory_released.discard("kv_cache")
    jax.block_until_ready((runner.params, runner.kv))
    return device_bytes(devices) - before
