"""Warm-up's step programs kept serialized, so that a later start loads each one without
tracing or lowering it (the scheduler option warmup_executables).

A persistent-cache hit still traces and lowers the whole model on the host (its key is the
lowered module): ~0.2 s a program for the 8B shape, serial under the GIL, which made most of
a warm start's 6.9 s warm-up on an H200 (2026-12-03). Here each program is stored under a
digest of everything that makes it (engine.probe_memo.probe_key: the sources, jax and
jaxlib versions, XLA_FLAGS; the backend, its options and devices; the model's config; the
structure, shapes, dtypes and shardings of every argument: weights, KV cache, the bucket's
batch; the sampling mode), in $ENGINE_CACHE_DIR/programs. A file that cannot be read or
loaded is compiled again, and a loaded program whose argument types differ from a step's
falls back to the jitted step (ModelRunner.call_step), so a stale file costs time, never
a wrong program.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import jax

from engine.envs import cache_dir
from engine.probe_memo import probe_key, tree_signature

log = logging.getLogger(__name__)


def step_key(runner: Any, t: int, s: int, p: int, decode_only: bool, mode: Any) -> str:
    """The digest a step program of one bucket shape is stored under."""
    backend = runner.backend
    args = runner.idle_args(t, s, p, decode_only, mode)[:-1]  # (the mode is static)
    return probe_key(
        kind="step", backend=backend.name, options=sorted(backend.options.items()),
        capabilities=backend.capabilities,
        devices=[d.device_kind for d in backend.model_devices()], cfg=runner.cfg,
        max_seqs=runner.buckets.seqs[-1], mode=mode, shape=(t, s, p, decode_only),
        args=tree_signature(args))


def _path(key: str) -> Path:
    return cache_dir() / "programs" / f"{key}.pkl"


def stored(key: str) -> bool:
    """Whether a program is stored under `key` (loadable or not)."""
    return _path(key).exists()


def load(key: str) -> Any:
    """The stored program (a jax.stages.Compiled on this process's devices), or None."""
    path = _path(key)
    if not path.exists():
        return None
    try:
        from jax.experimental.serialize_executable import deserialize_and_load

        blob, in_tree, out_tree = pickle.loads(path.read_bytes())
        return deserialize_and_load(blob, in_tree, out_tree)
    except Exception as e:  # a truncated or foreign file: compile instead
        log.warning("stored program %s not loaded (%s: %s): compiling it", path.name,
                    type(e).__name__, e)
        return None


def save(key: str, compiled: jax.stages.Compiled) -> bool:
    """Store `compiled`; False where the platform cannot serialize it or the folder cannot
    be written (the next start then compiles it, from the persistent cache)."""
    path = _path(key)
    try:
        from jax.experimental.serialize_executable import serialize

        blob = pickle.dumps(serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{id(compiled)}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a concurrent start reads the old file or the new one
        return True
    except Exception as e:
        log.warning("step program not stored (%s: %s)", type(e).__name__, e)
        return False
