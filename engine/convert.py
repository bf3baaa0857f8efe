"""`engine convert MODEL OUT --format orbax`: the model as the engine runs it (loaded, q/k/v
fused, quantized as asked) written as an orbax checkpoint that `engine serve OUT` and
`LLM(OUT)` restore straight onto the mesh (engine.loader.orbax).

The weights go through the same path as an engine start (builder.load_weights) on the
chosen backend, in its default dtype unless --dtype says otherwise. Only the --quantization
given here (or in the --config file) is applied: the CPU preset's quantization (auto) is not,
nor a backend's own layout (Backend.prepare_weights: the CPU's VNNI tiles), so a checkpoint
converted on one machine serves on any backend; the engine that restores it applies its own
preset's layout then.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from engine.options import add_engine_args, engine_options

log = logging.getLogger(__name__)

FORMATS = ("orbax",)


@dataclasses.dataclass
class Setup:
    """What an engine start makes before it loads weights: config, backend, dtype, mesh."""
    config: Any
    backend: Any
    dtype: jnp.dtype
    mesh: Any
    rules: dict[str, Any]
    place: Any

    def load(self, model: str | None, **options: Any) -> Any:
        """builder.load_weights of `model` (engine options as keywords) on this setup."""
        from engine.builder import load_weights

        cfg = dataclasses.replace(self.config, model=dataclasses.replace(
            self.config.model, model=model, **options))
        return load_weights(cfg, self.backend, self.dtype, scan=False, mesh=self.mesh,
                            rules=self.rules, place=self.place)


def setup(model: str | None, *, backend: str = "auto", config: str | None = None,
          **options: Any) -> Setup:
    """The backend, dtype and mesh an engine with these options would load weights on."""
    from engine.backend import get_backend
    from engine.config import EngineConfig
    from engine.parallel.mesh import init_distributed, make_mesh
    from engine.parallel.sharding import make_rules, named_sharding

    cfg = EngineConfig.build(config, model=model, backend=None if backend == "auto" else backend,
                             **options)
    be = get_backend(cfg.backend.name, dict(cfg.backend.options))
    init_distributed(cfg.parallel, be.capabilities.platform)
    dtype = jnp.dtype(cfg.model.dtype or be.capabilities.default_dtype)
    mesh = make_mesh(cfg.parallel, be.devices())  # a model too large for one device
    rules = make_rules(cfg.parallel.expert_parallel, dict(cfg.parallel.axis_rules))
    place = None
    if mesh is not None:
        be.mesh, be.mesh_rules = mesh, rules
        place = functools.partial(named_sharding, mesh=mesh, rules=rules)
    return Setup(cfg, be, dtype, mesh, rules, place)


def convert(model: str | None, out: str | Path, *, backend: str = "auto",
            config: str | None = None, **options: Any) -> Path:
    """Load `model` as an engine would (engine options as keywords) and save it to `out`."""
    from engine.loader import orbax

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before a long load
        raise ValueError(f"{out} exists and is not an empty folder; choose a new output folder")
    s = setup(model, backend=backend, config=config, **options)
    t0 = time.perf_counter()
    loaded = s.load(model)
    log.info("loaded %s in %.1fs", loaded.name, time.perf_counter() - t0)
    return orbax.save(out, loaded.cfg, loaded.params, dtype=s.dtype.name,
                      quantization=loaded.quantization, tokenizer=loaded.tokenizer,
                      source=str(model or loaded.name))


def cmd_convert(args: argparse.Namespace) -> int:
    opts = engine_options(args)
    model = args.model_path or args.model
    out = convert(model, args.out, backend=args.backend, config=args.config, **opts)
    print(f"wrote {out} ({args.format}); serve it with: engine serve {out}")
    return 0


def register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write a model as an orbax checkpoint",
                       description="Load MODEL as the engine runs it (q/k/v fused, quantized "
                       "with --quantization) and write it to OUT, a new folder that "
                       "`engine serve OUT` restores straight onto the devices' shards at any "
                       "--tp.")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, .gguf file, alias or (with --load-format dummy) a "
                   "known shape (same as --model; default: the default model)")
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to create")
    p.add_argument("--format", default="orbax", choices=FORMATS)
    add_engine_args(p)
    p.set_defaults(func=cmd_convert)
