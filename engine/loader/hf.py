"""HF model folders: config.json + safetensors (one file, or shards listed in
model.safetensors.index.json). Tensors keep their names, layouts and float dtype; a
checkpoint whose config has a `quantization_config` has its quantized linears repacked as
QuantizedWeights, as stored (engine.loader.prequant)."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from engine.loader.checkpoint import Checkpoint, ModelLoadError, check_tensors
from engine.model.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPES = {name: np.dtype(t) for name, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
    "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}.items()}
"""Safetensors dtype names -> numpy dtypes (the format is little-endian, as are the hosts
the engine runs on)."""


def load_hf(path: Path, progress: bool = True) -> Checkpoint:
    """Load an HF model folder; every failure is a one-line ModelLoadError or ConfigError."""
    config = read_config(path / "config.json")
    quant = _raw_config(path / "config.json").get("quantization_config")
    files = safetensors_files(path)
    tensors: dict[str, np.ndarray] = {}
    with tqdm(desc=f"Loading {path.name}", unit="tensor", disable=not progress) as bar:
        for file in files:
            _read_safetensors(file, tensors, bar)
    # Not parameters of ours: rotary tables some old checkpoints saved, and the head when it
    # is the embedding (a few checkpoints store the tied copy).
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    fmt = None
    if quant:
        from engine.loader.prequant import convert

        if not isinstance(quant, dict):
            raise ModelLoadError(path / "config.json", "quantization_config is not an object")
        tensors, fmt = convert(path, quant, tensors)
    check_tensors(path, config, tensors)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    return Checkpoint(config, tensors, path if has_tokenizer else None, path, fmt)


def _raw_config(config_path: Path) -> dict:
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(config_path, f"unreadable config ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(config_path, "config is not a JSON object")
    return raw


def read_config(config_path: Path) -> ModelConfig:
    raw = _raw_config(config_path)
    try:
        return ModelConfig.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {' '.join(str(e).split())}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(config_path, f"not a usable model config ({e!r})") from None


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: the shards named by the index, else every *.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(index, f"unreadable shard index ({e!r})") from None
        for name in names:
            if not (path / name).is_file():
                raise ModelLoadError(path / name, f"missing shard listed in {INDEX_FILE}")
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(path, "no *.safetensors weights (other weight formats unsupported)")
    return files


def _read_safetensors(file: Path, out: dict[str, np.ndarray], bar: tqdm) -> None:
    """Every tensor of `file` as a numpy view of the memory-mapped file: no copy is made
    here; pages are read when a tensor is first touched (put on a device, repacked), so
    reading overlaps the transfers (engine.model.weights.params_from_hf). The mapping is
    private copy-on-write: a consumer writing into a tensor never changes the file."""
    try:  # safetensors validates the header (offsets, coverage of the data) for its errors
        with safe_open(file, framework="np") as f:
            f.keys()
    except Exception as e:  # SafetensorError is not exported as a stable type; wrap all
        raise ModelLoadError(file, f"unreadable safetensors ({e})") from None
    header, data_start = _header(file)
    header.pop("__metadata__", None)
    bar.total = (bar.total or 0) + len(header)  # shards are opened one at a time
    bar.refresh()
    size = file.stat().st_size
    with open(file, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, entry in header.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelLoadError(file, f"{name} has dtype {entry['dtype']}, which this "
                                 f"loader does not read (supported: {', '.join(DTYPES)})")
        begin, end = entry["data_offsets"]
        if data_start + end > size:
            raise ModelLoadError(file, f"truncated data for {name}")
        count = (end - begin) // dtype.itemsize
        # [*shape] view of the mapped bytes; it keeps the mapping alive
        out[name] = np.frombuffer(buf, dtype, count, data_start + begin).reshape(
            entry["shape"])
        bar.update()


def _header(file: Path) -> tuple[dict, int]:
    """Safetensors layout: u64 little-endian header length N, N bytes of JSON, then the data;
    each entry's `data_offsets` are relative to the first data byte."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header, 8 + n
