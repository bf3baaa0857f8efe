"""Orbax checkpoints of the loaded model (`engine convert MODEL OUT --format orbax`) and
their restore straight onto the shards of the current mesh (`--load-format orbax`).

What is saved is the model's parameter pytree as the engine runs it (after q/k/v fusion
and any quantization), not HF tensors, so a restore is only a read: no transposes, no
casts beyond the engine's dtype, no fusion. Folder layout:

    engine_orbax.json  format version, the ModelConfig, dtype, quantization, source, and per
                       parameter its shape, dtype and logical axes (engine.model.axes); a
                       QuantizedWeight also its format and logical in/out shapes. Written
                       last: a folder without it is not (or not yet) a checkpoint.
    params/            the arrays: one orbax PyTree checkpoint (tensorstore, OCDBT)
    tokenizer/         the tokenizer's files (absent when the model has none)

Saved tree: {"embed", "norm", "lm_head"?, "layers": {"0": {...}, "1": ...}}, layers
unrolled whatever the engine's scan setting; a QuantizedWeight is a dict of its array
fields ("data", "scales", "zeros"), leaving out those that are None and those that are empty
(orbax cannot store zero-size arrays; the description keeps their shapes).

Restore: every array is read by orbax/tensorstore into the sharding its logical axes get on
the current mesh (engine.parallel.sharding), so each device reads only its own slices and
the TP size may differ from the one saved with. A QuantizedWeight's arrays go where the
engine puts them (engine.model.weights.quantized_shardings: rows with their scales and
zero points). Arrays are read in groups of layers, with progress in the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.loader.checkpoint import ModelLoadError
from engine.loader.load import ORBAX_META
from engine.model.axes import PARAM_AXES
from engine.model.config import ModelConfig
from engine.model.quant import QuantizedWeight
from engine.model.weights import Place, fuse_gate_up, fuse_qkv, random_params

log = logging.getLogger(__name__)

META = ORBAX_META
FORMAT = "engine-orbax"
VERSION = 1
GROUPS = 8
"""Restore reads the layers in about this many groups (one progress line each)."""
QUANT_ARRAYS = ("data", "scales", "zeros")
"""QuantizedWeight's array fields (engine.model.quant); a field may be None."""


@dataclasses.dataclass
class OrbaxModel:
    config: ModelConfig
    params: dict
    """The parameter pytree, layers unrolled (a list), on the mesh's shards."""
    tokenizer_path: Path | None
    quantization: str | None
    """The quantization the weights were saved with (already applied), or None."""
    source: str
    """What was converted (a path or an alias)."""


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ValueError("orbax checkpoints need orbax-checkpoint: pip install "
                         "'engine[orbax]'") from None
    return ocp


@contextlib.contextmanager
def _checkpointer() -> Iterator[Any]:
    """A PyTree checkpointer without zstd: model weights barely compress, and decompression
    halved the restore rate (SmolLM2-135M float32, 2026-12-03, 2-core CPU: 0.54 GB stored
    as 334 MB restored in 4.0 s, uncompressed in 2.0 s). Orbax's INFO lines (a dozen per
    call) are held back to warnings meanwhile."""
    ocp = _orbax()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(max(level, logging.WARNING))
    ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    try:
        yield ckpt
    finally:
        ckpt.close()
        absl.setLevel(level)


def _entries(params: dict) -> dict[str, Any]:
    """Parameter name ("embed", "layers.3.wqkv") -> array or QuantizedWeight, unrolled."""
    out = {k: v for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, dict):  # stacked [L, ...] (lax.scan): one slice per layer
        n = jax.tree.leaves(layers)[0].shape[0]
        layers = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]
    for i, lp in enumerate(layers):
        out |= {f"layers.{i}.{name}": v for name, v in lp.items()}
    return out


def _nest(flat: dict[str, Any]) -> dict:
    """{"layers.3.wq": x} -> {"layers": {"3": {"wq": x}}} (orbax's tree)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, last = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def _describe(name: str, leaf: Any) -> dict[str, Any]:
    axes = list(PARAM_AXES[name.rsplit(".", 1)[-1]])
    if isinstance(leaf, QuantizedWeight):
        arrays = {f: {"shape": list(a.shape), "dtype": a.dtype.name}
                  for f in QUANT_ARRAYS if (a := getattr(leaf, f, None)) is not None}
        return {"axes": axes, "quantized": leaf.fmt, "in_shape": list(leaf.in_shape),
                "out_shape": list(leaf.out_shape), "arrays": arrays}
    return {"shape": list(leaf.shape), "dtype": leaf.dtype.name, "axes": axes}


def _config_json(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _config_from_json(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)


def save(out: str | Path, cfg: ModelConfig, params: dict, *, dtype: str,
         quantization: str | None, tokenizer: Any, source: str) -> Path:
    """Write `params` (as the engine runs them) with what rebuilds the model into `out`,
    which must not exist or be empty."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new output folder")
    entries = _entries(params)
    tree = {}
    for name, leaf in entries.items():
        if isinstance(leaf, QuantizedWeight):
            leaf = {f: a for f in QUANT_ARRAYS
                    if (a := getattr(leaf, f, None)) is not None and a.size}
        tree[name] = leaf
    t0 = time.perf_counter()
    with _checkpointer() as ckpt:
        ckpt.save(out / "params", _nest(tree))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    log.info("orbax: saved %d arrays, %.2f GB in %.1fs to %s", len(jax.tree.leaves(tree)),
             nbytes / 1e9, time.perf_counter() - t0, out / "params")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {"format": FORMAT, "version": VERSION, "source": source, "dtype": dtype,
            "quantization": quantization, "model_config": _config_json(cfg),
            "params": {name: _describe(name, leaf) for name, leaf in entries.items()}}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise ModelLoadError(path, f"{what}; expected an orbax checkpoint folder written by "
                             f"`engine convert MODEL OUT --format orbax`")
    if not (path / META).is_file():
        raise ModelLoadError(path, f"not an orbax checkpoint of this engine (no {META}); "
                             f"write one with `engine convert MODEL OUT --format orbax`")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(path / META, f"not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelLoadError(path / META, f"format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}; this engine reads {FORMAT} {VERSION}")
    if not (path / "params").is_dir():
        raise ModelLoadError(path, "has no params/ folder (an interrupted conversion?); "
                             "convert again")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an orbax checkpoint folder, without reading its arrays."""
    path = Path(path).expanduser().resolve()
    try:
        return _config_from_json(_read_meta(path)["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(path / META, f"unusable model_config ({e!r})") from None


def _expected_shapes(cfg: ModelConfig, fused: bool, gate_up: bool = False
                     ) -> dict[str, tuple[int, ...]]:
    """Every parameter's logical shape for `cfg`, as loaded (and fused: q/k/v, gate/up) by
    the engine; checkpoints written before gate/up fusion keep w_gate and w_up."""
    def make():
        p = random_params(cfg, jnp.float32, scan=False)
        p = fuse_qkv(p) if fused else p
        return fuse_gate_up(p) if gate_up else p
    return {n: tuple(a.shape) for n, a in _entries(jax.eval_shape(make)).items()}


def _check(path: Path, cfg: ModelConfig, described: dict[str, dict]) -> None:
    """One-line errors for a description that does not fit the model config."""
    want = _expected_shapes(cfg, fused=any(n.endswith(".wqkv") for n in described),
                            gate_up=any(n.endswith(".w_gate_up") for n in described))
    for kind, names in (("missing", [n for n in want if n not in described]),
                        ("unexpected", [n for n in described if n not in want])):
        if names:
            raise ModelLoadError(path, f"{kind} parameters {', '.join(names[:3])}"
                                 f"{' ...' if len(names) > 3 else ''} for this model config")
    for name, d in described.items():
        if "quantized" in d:  # stored by output channel: compare the element count
            lead = d["arrays"]["data"]["shape"][:-2]  # stacked experts [X, N, K]
            got = tuple(lead + d["in_shape"] + d["out_shape"])
            ok = math.prod(got) == math.prod(want[name])
        else:
            got = tuple(d["shape"])
            ok = got == want[name]
        if not ok:
            raise ModelLoadError(path, f"{name} has shape {got}, the config implies "
                                 f"{want[name]}")


def _groups(names: list[str], nbytes: dict[str, int]) -> list[list[str]]:
    """Consecutive parameters in groups of about 1/GROUPS of the bytes (whole layers)."""
    target = sum(nbytes.values()) / GROUPS
    groups: list[list[str]] = [[]]
    size, layer = 0, None
    for name in names:
        this = name.split(".")[1] if name.startswith("layers.") else None
        if groups[-1] and size >= target and this != layer:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes[name]
        layer = this
    return groups


def restore(path: str | Path, *, dtype: jnp.dtype, place: Place | None,
            device: jax.Device, progress: bool = True) -> OrbaxModel:
    """Read an orbax checkpoint onto the mesh (`place`: shape, axes -> sharding) or onto
    `device`. Float weights come in `dtype`; quantized arrays as saved."""
    ocp = _orbax()
    path = Path(path).expanduser().resolve()
    meta = _read_meta(path)
    cfg = read_config(path)
    described: dict[str, dict] = meta["params"]
    _check(path, cfg, described)
    single = jax.sharding.SingleDeviceSharding(device)

    def target(shape: list[int], dt: Any, axes: tuple) -> Any:
        sharding = place(tuple(shape), axes) if place is not None else single
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dt), sharding=sharding)

    targets: dict[str, Any] = {}
    quant_shardings: dict[str, dict[str, Any]] = {}
    for name, d in described.items():
        if "quantized" in d:
            where = quant_shardings[name] = _quantized_shardings(d, place, single)
            targets[name] = {f: jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]),
                                                     sharding=where[f])
                             for f, a in d["arrays"].items() if math.prod(a["shape"])}
        else:
            targets[name] = target(d["shape"], dtype, tuple(d["axes"]))
    nbytes = {n: sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(t))
              for n, t in targets.items()}
    total, done, t0 = sum(nbytes.values()), 0, time.perf_counter()
    arrays: dict[str, Any] = {}
    try:
        with _checkpointer() as ckpt:
            # Older orbax (no partial restore) reads the whole tree in one call.
            partial = "partial_restore" in {f.name for f in
                                            dataclasses.fields(ocp.args.PyTreeRestore)}
            groups = _groups(list(targets), nbytes) if partial else [list(targets)]
            for i, group in enumerate(groups):
                item = _nest({n: targets[n] for n in group})
                args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
                    sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
                kw = {"partial_restore": True} if partial else {}
                got = ckpt.restore(path / "params", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, **kw))
                for n in group:
                    node = got
                    for part in n.split("."):
                        node = node[part]
                    arrays[n] = node
                done += sum(nbytes[n] for n in group)
                if progress:
                    dt = time.perf_counter() - t0
                    log.info("orbax restore %d/%d: %.2f of %.2f GB, %.1fs (%.2f GB/s)", i + 1,
                             len(groups), done / 1e9, total / 1e9, dt, done / 1e9 / max(dt, 1e-9))
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ModelLoadError(path / "params", f"orbax restore failed: {e}") from None
    params = _assemble(cfg, arrays, described, quant_shardings)
    tok = path / "tokenizer"
    return OrbaxModel(cfg, params, tok if tok.is_dir() else None, meta.get("quantization"),
                      str(meta.get("source", path)))


def _quantized_shardings(d: dict[str, Any], place: Place | None, single: Any
                         ) -> dict[str, Any]:
    """Field -> sharding of a described QuantizedWeight: the device, or the engine's own
    placement on the mesh (the one place_params gives the weight when it loads)."""
    if place is None:
        return {f: single for f in d["arrays"]}
    from engine.model.weights import quantized_shardings

    shapes = {f: jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]))
              for f, a in d["arrays"].items()}
    w = QuantizedWeight(**shapes, fmt=d["quantized"], in_shape=tuple(d["in_shape"]),
                        out_shape=tuple(d["out_shape"]))
    where = quantized_shardings(w, tuple(d["axes"]), place)
    return {f: getattr(where, f) for f in d["arrays"]}


def _assemble(cfg: ModelConfig, arrays: dict[str, Any], described: dict[str, dict],
              quant_shardings: dict[str, dict[str, Any]]) -> dict:
    """The engine's params pytree from the restored arrays (QuantizedWeights rebuilt)."""
    def leaf(name: str) -> Any:
        d, a = described[name], arrays[name]
        if "quantized" not in d:
            return a
        fields = {f: a.get(f) if math.prod(x["shape"]) else  # e.g. scales [(L,) 0]
                  jax.device_put(np.zeros(x["shape"], jnp.dtype(x["dtype"])),
                                 quant_shardings[name][f])
                  for f, x in d["arrays"].items()}
        return QuantizedWeight(**fields, fmt=d["quantized"], in_shape=tuple(d["in_shape"]),
                               out_shape=tuple(d["out_shape"]))

    params: dict = {n: leaf(n) for n in arrays if not n.startswith("layers.")}
    layers: list[dict] = [{} for _ in range(cfg.num_layers)]
    for n in arrays:
        if n.startswith("layers."):
            _, i, name = n.split(".")
            layers[int(i)][name] = leaf(n)
    params["layers"] = layers
    return params
