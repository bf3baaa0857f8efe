"""Random bfloat16 weights of a known shape (engine.model.presets) as an HF model folder:
config.json, model-0000k-of-0000n.safetensors shards of about --shard-gb, and the shard
index. For load benchmarks (scripts/gpu/orbax.sh): the values are one 32 MB block of
N(0, 0.02) draws repeated, so writing 16 GB takes disk time, not random-number time.

The safetensors format is written directly (8-byte little-endian header length, a JSON
header of dtype / shape / data_offsets per tensor padded to 8 bytes, then the raw data):
safetensors' numpy API has no bfloat16.

    python3 scripts/gpu/random_safetensors.py llama-3.1-8b OUT_DIR [--shard-gb 5]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from engine.loader.checkpoint import expected_shapes
from engine.model.presets import PRESETS, preset_config

BLOCK = 1 << 24
"""bf16 values per write: 32 MB."""


def write(shape_name: str, out: Path, shard_bytes: float) -> int:
    cfg = preset_config(shape_name)
    if cfg is None:
        raise SystemExit(f"unknown shape {shape_name!r}; known: {', '.join(PRESETS)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(PRESETS[shape_name], indent=1))
    shapes = expected_shapes(cfg)
    block = (np.random.default_rng(0).standard_normal(BLOCK, dtype=np.float32) * 0.02)
    raw = block.astype(ml_dtypes.bfloat16).view(np.uint16)  # [BLOCK] bf16 bit patterns
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name in names:
                left = math.prod(shapes[name])
                while left:
                    n = min(left, BLOCK)
                    f.write(raw[:n].tobytes())
                    left -= n
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("out", type=Path)
    p.add_argument("--shard-gb", type=float, default=5.0)
    args = p.parse_args()
    t0 = time.perf_counter()
    total = write(args.shape, args.out, args.shard_gb * 1e9)
    print(f"wrote {total / 1e9:.2f} GB of {args.shape} to {args.out} in "
          f"{time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
