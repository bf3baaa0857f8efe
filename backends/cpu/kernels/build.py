"""Build and load the CPU kernel library (C++ XLA FFI handlers) from the repo's sources.

`make install` / `make test` run `python -m backends.cpu.kernels.build` after pip; the
engine builds it on first use too when it is missing (a fresh clone installed some other
way). The library's name carries a hash of the sources, flags and jaxlib version, so a stale
build is never loaded. Without a C++ compiler, or when the build fails, `load()` logs one
warning and returns None: the backend then runs the plain-JAX path (the oracle).

ISA-specific code is compiled with per-function target attributes, so one library serves
every x86-64 CPU; the level is chosen at run time (engine_cpu_isa(), ENGINE_CPU_ISA).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import envs

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "linear" / "linear.cc", HERE / "linear" / "packed.cc",
           HERE / "attention" / "attention.cc", HERE / "norm" / "norm.cc")
HEADERS = (HERE / "linear" / "packed.h",)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-pthread")


class BuildError(RuntimeError):
    """The kernel library could not be built; the message says why and what to install."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _key() -> str:
    import jaxlib

    h = hashlib.sha256()
    for src in (*SOURCES, *HEADERS):
        h.update(src.read_bytes())
    h.update(" ".join(FLAGS).encode() + jaxlib.__version__.encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """Where the library for these sources lives: beside them (an editable install), or in
    the engine's cache folder when the package folder is read-only."""
    name = f"libengine_cpu-{_key()}.so"
    local = HERE / "_build"
    if os.access(HERE, os.W_OK):
        return local / name
    return envs.cache_dir() / "kernels" / name


def build(out: Path | None = None) -> Path:
    """Compile the sources into `out` (default library_path()); raises BuildError."""
    import jax.ffi

    out = out or library_path()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise BuildError(f"the CPU kernels are x86-64 only (this is {platform.machine()})")
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (install g++ or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise BuildError(f"{Path(cxx).name} failed ({done.returncode}):\n{tail}")
        os.replace(tmp, out)  # atomic: a concurrent build or reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in out.parent.glob("libengine_cpu-*.so"):  # builds of older sources
        if old != out:
            old.unlink(missing_ok=True)
    return out


@functools.cache
def load(path: Path | None = None) -> ctypes.CDLL | None:
    """The kernel library (built now if missing), or None with one warning."""
    try:
        path = path or library_path()
        if not path.exists():
            log.warning("building the CPU kernels (once, about half a minute): %s", path.name)
            build(path)
        return ctypes.CDLL(str(path))
    except (BuildError, OSError) as e:
        log.warning("CPU kernels unavailable, using the plain-JAX path: %s", e)
        return None


def register(target: str, symbol: str) -> ctypes.CDLL | None:
    """The library with its handler `symbol` registered as the CPU FFI target `target`, or
    None without the library. Each kernel module calls it once (behind functools.cache)."""
    import jax

    lib = load()
    if lib is not None:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


def main() -> int:
    """Build the library now (make install); never fails the install: the engine runs the
    plain-JAX path without it."""
    try:
        path = library_path()
        print(f"CPU kernels: {path if path.exists() else build(path)}")
    except BuildError as e:
        print(f"CPU kernels not built, the engine will use the plain-JAX path: {e}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
