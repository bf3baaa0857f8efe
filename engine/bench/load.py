"""`engine bench load`: the time from checkpoint files to weights on the devices, ready to
serve (q/k/v fused, quantized as asked), from the source (HF safetensors or GGUF) and from
its orbax conversion (engine convert), on the same backend and mesh.

Each load runs --repeat times; the first run of each may read its files from disk, later
ones from the page cache (the report says which figure is which). Without --orbax the
source is converted into a temporary folder first (not timed) and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def time_loads(setup: Any, model: str | None, repeat: int, **options: Any) -> dict[str, Any]:
    """Seconds of each load of `model` until its params are on the devices."""
    import jax

    from engine.model.weights import tree_bytes

    times, nbytes = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        loaded = setup.load(model, **options)
        jax.block_until_ready(loaded.params)
        times.append(time.perf_counter() - t0)
        nbytes = tree_bytes(loaded.params)
        del loaded
    best = min(times[1:] or times)
    return {"model": str(model), "seconds": times, "first_s": times[0], "best_s": best,
            "bytes": nbytes, "best_gb_per_s": nbytes / best / 1e9}


def cmd_load(args: argparse.Namespace) -> int:
    from engine.bench.hostload import HostLoad, on_cpu
    from engine.convert import convert, setup
    from engine.options import engine_options

    opts = engine_options(args)
    load = HostLoad.start(on_cpu(args))
    if args.source_only:
        return _source_only(args, opts, load)
    tmp = None
    orbax_dir = args.orbax
    if orbax_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="engine-orbax-"))
        orbax_dir = str(convert(args.model, tmp / "ck", backend=args.backend,
                                config=args.config, **opts))
    try:
        s = setup(args.model, backend=args.backend, config=args.config, **opts)
        rows = [time_loads(s, args.model, args.repeat),
                time_loads(s, orbax_dir, args.repeat, load_format="orbax")]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    load.finish()
    devices = s.mesh.devices.size if s.mesh is not None else 1
    print(f"{'checkpoint':<12} {'GB':>6} {'first s':>8} {'best s':>8} {'GB/s':>7}")
    for name, r in zip(("source", "orbax"), rows, strict=True):
        print(f"{name:<12} {r['bytes'] / 1e9:>6.2f} {r['first_s']:>8.2f} {r['best_s']:>8.2f} "
              f"{r['best_gb_per_s']:>7.2f}")
    speedup = rows[0]["best_s"] / rows[1]["best_s"]
    print(f"orbax restore {speedup:.2f}x faster than the source ({s.backend.capabilities.platform}"
          f", {devices} device(s), {s.dtype.name}; best of {args.repeat}, page cache warm after "
          f"the first)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            {"rows": rows, "speedup": speedup, "devices": devices, "dtype": s.dtype.name,
             "platform": s.backend.capabilities.platform, "host_load": load.as_dict()},
            indent=2))
    return 0


def _source_only(args: argparse.Namespace, opts: dict[str, Any], load: Any) -> int:
    """--source-only: the source checkpoint's load alone (no conversion, no orbax)."""
    from engine.convert import setup

    s = setup(args.model, backend=args.backend, config=args.config, **opts)
    row = time_loads(s, args.model, args.repeat)
    load.finish()
    platform = s.backend.capabilities.platform
    print(f"source load {row['bytes'] / 1e9:.2f} GB: first {row['first_s']:.2f} s, best "
          f"{row['best_s']:.2f} s, {row['best_gb_per_s']:.2f} GB/s ({platform}, "
          f"{s.dtype.name}; best of {args.repeat}, page cache warm after the first)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            {"rows": [row], "dtype": s.dtype.name, "platform": platform,
             "host_load": load.as_dict()}, indent=2))
    return 0


def register_load(bench: argparse._SubParsersAction) -> None:
    from engine.options import add_engine_args

    p = bench.add_parser("load", help="weights load time: the source checkpoint vs its orbax "
                         "conversion")
    add_engine_args(p)
    p.add_argument("--orbax", default=None, help="the orbax conversion of --model (default: "
                   "convert into a temporary folder first)")
    p.add_argument("--repeat", type=int, default=3, help="loads of each checkpoint")
    p.add_argument("--source-only", action="store_true", help="time the source checkpoint's "
                   "load alone (no orbax conversion)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_load)
