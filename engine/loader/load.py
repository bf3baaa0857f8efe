"""The one entry point that loads any checkpoint source (engine.loader.checkpoint describes
what comes out): the default model or an alias, an HF folder, a GGUF file; and the test
for an orbax checkpoint folder, which the engine restores itself (engine.loader.orbax)."""

from __future__ import annotations

from pathlib import Path

from engine.loader import hub
from engine.loader.checkpoint import Checkpoint, ModelLoadError

ORBAX_META = "engine_orbax.json"
"""The file that marks an orbax checkpoint folder (engine.loader.orbax)."""


def is_orbax_checkpoint(path: str | Path | None) -> bool:
    """A folder written by `engine convert MODEL OUT --format orbax` (engine.loader.orbax):
    the engine restores it onto the mesh itself (builder.load_model); it holds the model's
    parameters, not HF tensors."""
    return path is not None and (Path(path).expanduser() / ORBAX_META).is_file()


def load_checkpoint(path_or_alias: str | Path | None, progress: bool = True) -> Checkpoint:
    """Load the default model (None or an alias in `hub.ALIASES`), an HF model folder (with
    config.json and *.safetensors) or a GGUF file (or a folder holding exactly one .gguf)."""
    if path_or_alias is None or str(path_or_alias) in hub.ALIASES:
        return _load_gguf(hub.fetch_model(path_or_alias, progress=progress), progress)
    path = Path(path_or_alias).expanduser()
    if is_orbax_checkpoint(path):
        raise ModelLoadError(path, "an orbax checkpoint of the engine's own parameters, not HF "
                             "tensors: give it to LLM or engine serve (--load-format orbax), "
                             "which restore it onto the mesh")
    if path.is_dir():
        if (path / "config.json").is_file():
            from engine.loader.hf import load_hf

            return load_hf(path, progress=progress)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], progress)
        found = f"found {len(ggufs)} .gguf files" if ggufs else "found neither"
        raise ModelLoadError(
            path, f"expected an HF model folder with config.json or exactly one .gguf; {found}"
        )
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, progress)
    aliases = ", ".join(sorted(hub.ALIASES))
    what = "does not exist" if not path.exists() else "is not a .gguf file or a model folder"
    raise ModelLoadError(
        path, f"{what}; expected an HF model folder, a .gguf file or one of: {aliases}"
    )


def _load_gguf(path: Path, progress: bool) -> Checkpoint:
    from engine.loader.gguf import load_gguf

    return load_gguf(path, progress=progress)
