"""The activation probe's result, remembered across starts.

The probe (engine.builder.activation_peak) compiles the largest step program over a fixed
KV pool and reads its scratch size: on a warm start a persistent-cache hit, but still a
trace and lowering of the whole model (seconds for the 8B shape). Its result depends only
on the program and the compiler, so it is kept in $ENGINE_CACHE_DIR/probe under a digest
of everything that makes the program: the engine's and backends' sources, the jax and
jaxlib versions, XLA_FLAGS, the device kind, the backend and its options, the model's
config, the weights' tree (shapes, dtypes, shardings), the KV cache's abstract value and
the probe's bucket shape. Any change to one of them is another key, so a remembered peak is
only ever used for the very program that measured it (the pool's safety stays the probe's).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

from engine.envs import cache_dir

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
_SOURCES = ("engine", "backends")
_SUFFIXES = (".py", ".cc", ".cpp", ".h", ".cu", ".yaml")


@functools.cache
def source_digest() -> str:
    """sha256 of the engine's and backends' source files (path and content, sorted)."""
    h = hashlib.sha256()
    for pkg in _SOURCES:
        for f in sorted((_ROOT / pkg).rglob("*")):
            if f.suffix in _SUFFIXES and "__pycache__" not in f.parts and f.is_file():
                h.update(str(f.relative_to(_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def tree_signature(tree: Any) -> str:
    """Structure, shapes, dtypes and shardings of a pytree of arrays or ShapeDtypeStructs."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    parts = [str(treedef)]
    for path, x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{jax.tree_util.keystr(path)}:{getattr(x, 'shape', None)}:"
                     f"{getattr(x, 'dtype', type(x).__name__)}:{sharding}")
    return "\n".join(parts)


def probe_key(**parts: Any) -> str:
    """A digest of `parts` (reprs) with the sources, versions and XLA flags added."""
    import jaxlib

    parts.update(source=source_digest(), jax=jax.__version__,
                 jaxlib=getattr(jaxlib, "__version__", "?"),
                 xla_flags=os.environ.get("XLA_FLAGS", ""))
    text = "\n".join(f"{k}={parts[k]!r}" for k in sorted(parts))
    return hashlib.sha256(text.encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "probe" / f"{key}.json"


def recall(key: str) -> int | None:
    """The peak remembered under `key`, or None (never measured, or unreadable)."""
    try:
        return int(json.loads(_path(key).read_text())["peak_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(key: str, peak: int) -> None:
    """Keep `peak` under `key`; a cache folder that cannot be written only costs the probe
    next time."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"peak_bytes": int(peak)}))
        tmp.replace(path)  # atomic: a concurrent start reads the old file or the new one
    except OSError as e:
        log.warning("could not remember the activation peak in %s: %s", path, e)
