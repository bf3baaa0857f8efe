"""Compile for a TPU from a host without one: libtpu's compiler, no device (compile-only).

This is how the kernel is checked against the real Mosaic compiler on a CPU host: lowering
to Mosaic, Mosaic's layout passes and XLA:TPU all run; nothing executes. libtpu must be
importable; `ensure_libtpu()` installs the version jax pins (jax[tpu]) into the engine cache
with pip, for use through PYTHONPATH in a child process (the parent's jax is not touched).

    export PYTHONPATH=$(python -m backends.tpu.aot --libtpu-path):.
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m backends.tpu.aot [--memory]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import time
from pathlib import Path

from engine.envs import cache_dir

# (chip, dtype, head_dim, page_size, q heads, kv heads, layers) the kernel must compile for:
# Llama-3.1-8B (32/8, D 128), SmolLM2-135M (9/3, D 64), MQA and MHA, float32 and bfloat16.
KERNEL_CASES = [
    ("v5e", "bfloat16", 128, 16, 32, 8, 4),
    ("v5e", "bfloat16", 64, 32, 9, 3, 4),
    ("v5e", "float32", 128, 8, 8, 1, 0),
    ("v6e", "bfloat16", 128, 64, 32, 8, 4),
    ("v6e", "bfloat16", 64, 128, 4, 4, 0),
]


def libtpu_requirement() -> str:
    """The libtpu pin of this jax's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
    for req in importlib.metadata.requires("jax") or []:
        if req.startswith("libtpu") and 'extra == "tpu"' in req:
            return req.split(";")[0].replace(" ", "")
    raise RuntimeError("this jax declares no libtpu requirement")


def ensure_libtpu() -> Path:
    """A folder holding the pinned libtpu package (pip-installed into the cache once)."""
    req = libtpu_requirement()
    dest = cache_dir() / "libtpu" / re.sub(r"[^A-Za-z0-9.]+", "-", req.replace("*", "x"))
    if not (dest / "libtpu" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
               "--disable-pip-version-check", "--target", str(dest), req]
        subprocess.run(cmd, check=True, timeout=900)
    return dest


def compile_kernel(chip: str, dtype: str, head_dim: int, page: int, hq: int, hkv: int,
                   layers: int, *, tokens: int = 64, seqs: int = 8, pages: int = 64) -> float:
    """Compile the attention kernel for `chip` (block sizes from the table); seconds taken."""
    import jax
    import jax.numpy as jnp

    from backends.tpu.backend import TpuBackend
    from engine.attention import AttentionMetadata
    from engine.precompile import target_sharding

    sharding = target_sharding(chip)
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    i32 = jnp.int32
    md = AttentionMetadata(
        positions=sds((tokens,), i32), slot_mapping=sds((tokens,), i32),
        token_seq=sds((tokens,), i32), query_start=sds((seqs + 1,), i32),
        seq_lens=sds((seqs,), i32), page_table=sds((seqs, pages), i32),
        num_tokens=sds((), i32), page_size=page)
    cache = sds(((layers,) if layers else ()) + (4 * pages, hkv, page, head_dim), dtype)
    backend = TpuBackend({"interpret": False, "chip": chip})

    def attend(q, k, v, md, layer):
        return backend.attention(q, k, v, md, scale=head_dim**-0.5,
                                 layer=layer if layers else None)

    t0 = time.perf_counter()
    jax.jit(attend).trace(sds((tokens, hq, head_dim), dtype), cache, cache, md,
                          sds((), i32)).lower().compile()
    return time.perf_counter() - t0


def step_memory(chip: str, model: str, *, num_pages: int, page: int, scan: bool,
                dtype: str = "bfloat16") -> tuple[int, int]:
    """(KV cache bytes, XLA temporaries bytes) of the runner's step compiled for `chip`."""
    import jax
    import jax.numpy as jnp

    from backends.tpu.backend import TpuBackend
    from engine.compile import abstract_batch
    from engine.config import EngineConfig
    from engine.model.weights import fuse_qkv, random_params, tree_bytes
    from engine.precompile import model_config, target_sharding
    from engine.runner import make_step
    from engine.sampler import SamplingMode

    cfg = model_config(EngineConfig.build(None, model=model))
    sharding = target_sharding(chip)
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    dt = jnp.dtype(dtype)
    backend = TpuBackend({"interpret": False, "chip": chip})
    params = jax.tree.map(sds, jax.eval_shape(lambda: fuse_qkv(random_params(cfg, dt, scan=scan))))
    kv = jax.tree.map(sds, jax.eval_shape(
        lambda: backend.allocate_kv(cfg, num_pages, page, dt, scan=scan)))
    batch = abstract_batch(64, 8, 16, False, page, cfg.vocab_size, SamplingMode(), sharding)
    step = make_step(cfg, backend, 8)  # 8: the batch's sequences (prev_tokens' length)
    compiled = step.trace(params, kv, *batch, SamplingMode()).lower().compile()
    kv_bytes = tree_bytes(kv)
    return kv_bytes, compiled.memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.tpu.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libtpu-path", action="store_true",
                   help="install the pinned libtpu into the cache if needed; print its folder")
    p.add_argument("--memory", action="store_true",
                   help="KV and temporary bytes of a SmolLM2-135M step on v5e, per layer loop")
    args = p.parse_args(argv)
    if args.libtpu_path:
        print(ensure_libtpu())
        return 0
    if args.memory:
        for scan in (False, True):
            kv, temp = step_memory("v5e", "smollm2-135m", num_pages=2048, page=32, scan=scan)
            print(f"scan_layers={scan}: kv_bytes={kv} temp_bytes={temp}", flush=True)
        return 0
    for case in KERNEL_CASES:
        print(f"compiled {case} in {compile_kernel(*case):.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
