"""Precompile the step's bucket grid into the persistent compilation cache.

    python -m engine.precompile --config tpu-v6e --model llama-3.1-8b --load-format dummy \
        --max-total-tokens 262144 [--target v6e]

Builds the runner's own step (engine.runner.make_step) over abstract weights and KV cache
(jax.eval_shape: nothing is allocated, no checkpoint is read) and lowers and compiles it for
every reachable (tokens, sequences, pages) bucket, printing the time of each and the total.
The programs land in the persistent cache ($ENGINE_CACHE_DIR/xla), where a later
`engine serve` / LLM(...) with the same options finds them.

`--target v5e|v6e` compiles for that TPU from a host without one (compile-only, through
libtpu's TPU compiler; libtpu must be importable). The KV pool size is part of every
program: pass the same --max-total-tokens to precompile and to serve.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from engine.backend import Backend, get_backend
from engine.builder import kv_cache_dtype
from engine.compile import abstract_batch, enable_persistent_cache, reachable, step_buckets
from engine.config import EngineConfig
from engine.envs import cache_dir
from engine.model.config import ModelConfig
from engine.model.presets import preset_config
from engine.model.weights import fuse_gate_up, fuse_qkv, random_params, tree_bytes
from engine.options import add_engine_args, engine_options
from engine.runner import make_step
from engine.sampler import SamplingMode

log = logging.getLogger(__name__)

HBM_BYTES = {"v5e": 16 * 2**30, "v6e": 32 * 2**30}
"""HBM of one chip, for sizing the KV pool when compiling for a TPU that is not here."""
HBM_USABLE = 0.95  # share of HBM that XLA reports as its limit (approximately)


@dataclasses.dataclass(frozen=True)
class BucketTime:
    tokens: int
    seqs: int
    pages: int
    decode_only: bool
    lower_s: float
    """Trace + lower to StableHLO (including the Pallas kernel's Mosaic lowering)."""
    compile_s: float
    """XLA compile, or the persistent-cache load when warm."""


def model_config(config: EngineConfig) -> ModelConfig:
    """The model's shape without reading weights: a known shape name or a config.json."""
    name = config.model.model or ""
    cfg = preset_config(name)
    if cfg is not None:
        return cfg
    path = Path(name)
    from engine.loader.load import is_orbax_checkpoint

    if is_orbax_checkpoint(path):  # an `engine convert` folder
        from engine.loader.orbax import read_config

        return read_config(path)
    path = path / "config.json" if path.is_dir() else path
    if path.name != "config.json" or not path.exists():
        raise ValueError(f"precompile needs a known shape name, an HF folder with "
                         f"config.json or an orbax checkpoint folder, got {name!r}")
    return ModelConfig.from_json(path)


def kv_num_pages(config: EngineConfig, cfg: ModelConfig, backend: Backend, dtype: jnp.dtype,
                 param_bytes: int, target: str | None) -> int:
    """The builder's pool size: explicit max_total_tokens, else free memory after weights."""
    page = config.cache.page_size
    if config.cache.max_total_tokens is not None:
        return -(-config.cache.max_total_tokens // page)
    free = (int(HBM_BYTES[target] * HBM_USABLE) if target
            else backend.memory_info().free_bytes) - param_bytes
    per_page = 2 * cfg.num_layers * page * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    if free < per_page:
        where = f"one {target} chip" if target else "this device"
        raise ValueError(f"the weights ({param_bytes / 2**30:.1f} GiB) leave no room for a KV "
                         f"cache on {where}")
    log.warning("no --max-total-tokens: pool sized from memory; serve must end up with the "
                "same pool for these programs to be used")
    return max(1, int(free * config.cache.kv_memory_fraction // per_page))


def target_sharding(target: str | None) -> Any:
    if target is None:
        return None
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(f"{target}:1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    return jax.sharding.SingleDeviceSharding(topo.devices[0])


def precompile(config: EngineConfig, *, target: str | None = None, limit: int | None = None,
               modes: tuple[SamplingMode, ...] = (SamplingMode(),),
               cache: Path | None = None) -> list[BucketTime]:
    """Lower and compile the step for every reachable bucket (the first `limit` if given),
    into the persistent compilation cache `cache` when given (a GPU or TPU's programs)."""
    options = dict(config.backend.options)
    if target is not None:
        if config.backend.name != "tpu":
            raise ValueError(f"--target {target} compiles for a TPU: use --backend tpu")
        options.update(interpret=False, chip=target)
    backend = get_backend(config.backend.name, options)
    caps = backend.capabilities
    if cache is not None:
        enable_persistent_cache(cache, "tpu" if target is not None else caps.platform)
    dtype = jnp.dtype(config.model.dtype or caps.default_dtype)
    scan = caps.scan_layers if config.backend.scan_layers is None else config.backend.scan_layers
    cfg = model_config(config)
    sharding = target_sharding(target)
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    def made() -> Any:  # the weights as the engine loads them (engine.builder)
        params = random_params(cfg, dtype, scan=scan, seed=0)
        params = fuse_qkv(params) if config.model.fuse_qkv else params
        return fuse_gate_up(params) if config.model.fuse_gate_up else params

    params = jax.tree.map(sds, jax.eval_shape(made))
    param_bytes = tree_bytes(params)
    kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, dtype, backend)  # as the builder's
    num_pages = kv_num_pages(config, cfg, backend, kv_dtype, param_bytes, target)
    page = config.cache.page_size
    kv = jax.tree.map(sds, jax.eval_shape(
        lambda: backend.allocate_kv(cfg, num_pages, page, kv_dtype, scan=scan)))
    max_len = min(cfg.max_position_embeddings, num_pages * page,
                  config.model.max_model_len or cfg.max_position_embeddings)
    s = config.scheduler
    buckets = step_buckets(s, -(-max_len // page), backend.capabilities.min_seq_bucket,
                           backend.capabilities.min_token_bucket)
    grid = reachable(buckets)[:limit]
    log.info("%s on %s: %d pages x %d, max_model_len %d, %d buckets x %d sampling modes",
             config.model.model, target or backend.name, num_pages, page, max_len, len(grid),
             len(modes))
    step = make_step(cfg, backend, buckets.seqs[-1])
    times = []
    for mode in modes:
        for t, n, p, dec in grid:
            batch = abstract_batch(t, n, p, dec, page, cfg.vocab_size, mode, sharding,
                                   buckets.seqs[-1])
            t0 = time.perf_counter()
            lowered = step.trace(params, kv, *batch, mode).lower()
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            times.append(BucketTime(t, n, p, dec, t1 - t0, t2 - t1))
            print(f"tokens={t:5d} seqs={n:4d} pages={p:5d} decode_only={dec:d} "
                  f"lower={t1 - t0:7.2f}s compile={t2 - t1:7.2f}s", flush=True)
    return times


def add_precompile_args(p: argparse.ArgumentParser) -> None:

    add_engine_args(p)
    p.add_argument("--target", choices=sorted(HBM_BYTES), default=None,
                   help="compile for this TPU from a host without one (needs libtpu)")
    p.add_argument("--limit", type=int, default=None, help="only the first N buckets")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="persistent compilation cache (default $ENGINE_CACHE_DIR/xla)")


def cmd_precompile(args: argparse.Namespace) -> int:
    from engine.llm import default_preset

    opts = engine_options(args)
    backend = args.backend if args.backend != "auto" else None
    config_file = args.config or default_preset(args.backend)
    config = EngineConfig.build(config_file, model=args.model, backend=backend, **opts)
    t0 = time.perf_counter()
    times = precompile(config, target=args.target, limit=args.limit,
                       cache=args.cache_dir or cache_dir() / "xla")
    total = time.perf_counter() - t0
    lower, comp = sum(b.lower_s for b in times), sum(b.compile_s for b in times)
    print(f"{len(times)} programs: lower {lower:.1f}s + compile {comp:.1f}s; "
          f"total {total:.1f}s (with setup)")
    return 0


def register_precompile(sub: argparse._SubParsersAction) -> None:
    """`engine precompile ...`: registered by engine.cli."""
    p = sub.add_parser("precompile", help="compile the bucket grid into the compilation cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_precompile_args(p)
    p.set_defaults(func=cmd_precompile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.precompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_precompile_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    return cmd_precompile(args)


if __name__ == "__main__":
    sys.exit(main())
