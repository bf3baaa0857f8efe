"""HF model folders: config.json + safetensors (one file, or shards listed in
model.safetensors.index.json). Tensors keep their names, layouts and float dtype; a
checkpoint whose config has a `quantization_config` has its quantized linears repacked as
QuantizedWeights, as stored (engine.loader.prequant)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from engine.loader.checkpoint import Checkpoint, ModelLoadError, check_tensors
from engine.model.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}
"""Safetensors dtypes numpy lacks: read as raw bytes and viewed as these."""


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
    try:
        with safe_open(file, framework="np") as f:
            names = list(f.keys())
            bar.total = (bar.total or 0) + len(names)  # shards are opened one at a time
            bar.refresh()
            dtypes = {name: f.get_slice(name).get_dtype() for name in names}
            raw_names = [n for n in names if dtypes[n] in RAW_DTYPES]
            for name in names:
                if dtypes[name] not in RAW_DTYPES:
                    out[name] = f.get_tensor(name)
                    bar.update()
    except Exception as e:  # SafetensorError is not exported as a stable type; wrap all
        raise ModelLoadError(file, f"unreadable safetensors ({e})") from None
    if raw_names:  # numpy has no bfloat16 / float8: copy the raw bytes and reinterpret
        header, data_start = _header(file)
        with open(file, "rb") as fh:
            for name in raw_names:
                begin, end = header[name]["data_offsets"]
                raw = np.empty(end - begin, np.uint8)
                fh.seek(data_start + begin)
                if fh.readinto(raw) != raw.size:
                    raise ModelLoadError(file, f"truncated data for {name}")
                out[name] = raw.view(RAW_DTYPES[header[name]["dtype"]]).reshape(
                    header[name]["shape"])
                bar.update()


def _header(file: Path) -> tuple[dict, int]:
    """Safetensors layout: u64 little-endian header length N, N bytes of JSON, then the data;
    each entry's `data_offsets` are relative to the first data byte."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header, 8 + n
