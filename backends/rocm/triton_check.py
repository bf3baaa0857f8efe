"""Compile the ROCm backend's Triton kernels for an AMD target on a host without ROCm.

Two halves, as XLA on ROCm does them:
1. jax lowers a function for platform "rocm" (`lowering_platforms=("rocm",)` works on any
   host); each Pallas kernel becomes a `__gpu$xla.gpu.triton` custom call whose backend
   config holds the kernel's Triton IR (TTIR, MLIR bytecode) and its num_warps/num_stages;
2. Triton (the PyPI wheel, whose AMD backend links LLVM in-process) compiles that IR for
   GPUTarget("hip", arch, 64) down to a code object (hsaco).

The bytecode is written by jaxlib's MLIR and read back there (jaxlib registers the Triton
dialect), then printed as text, which the wheel's Triton parses. XLA compiles with the
Triton pinned in jaxlib, not the wheel's: a strong proxy, not proof (docs/rocm.md).
Uses jax internals (jax._src.lib.triton, jax._src.interpreters.mlir): for tests and tools.

`python -m backends.rocm.triton_check [PRESET ...]` compiles the kernels of each ROCm preset
(default: both) for its target and prints them with their LDS and code-object sizes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from engine.attention import AttentionMetadata

TRITON_CALL = "__gpu$xla.gpu.triton"
WAVEFRONT = 64
PRESETS = ("rocm-mi300x", "rocm-mi355x")
HEADS = (32, 8, 128)
"""Query heads, KV heads, head dim of the checked steps: Llama-3.1-8B's attention."""
NUM_PAGES = 8192


@dataclasses.dataclass(frozen=True)
class TritonCall:
    name: str
    ttir: str
    """The kernel's Triton IR as text."""
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Compiled:
    name: str
    arch: str
    hsaco_bytes: int
    shared_bytes: int
    """LDS the kernel needs per program (Triton's metadata)."""
    num_warps: int
    num_stages: int


def triton_calls(lowered: Any) -> list[TritonCall]:
    """Every Pallas (Triton) kernel of a jax `Lowered` (lowered for ROCm or CUDA)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir

    module = lowered.compiler_ir()
    found: list[Any] = []

    def walk(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.operation.attributes
                    if (child.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(attrs["call_target_name"]).value == TRITON_CALL):
                        found.append(attrs["mhlo.backend_config"])
                    walk(child.operation)

    walk(module.operation)
    ctx = jax_mlir.make_ir_context()
    jax_triton.dialect.register_dialect(ctx)
    calls = []
    for cfg in found:
        with ctx:
            text = ir.Module.parse(cfg["ir"].value_bytes).operation.get_asm(
                enable_debug_info=False)
        calls.append(TritonCall(name=ir.StringAttr(cfg["name"]).value, ttir=text,
                                num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                                num_stages=ir.IntegerAttr(cfg["num_stages"]).value))
    return calls


def compile_call(call: TritonCall, arch: str, workdir: Path) -> Compiled:
    """Compile one kernel for `arch` (gfx942, gfx950) with Triton's AMD backend; raises
    Triton's error when it does not compile. `workdir` holds the IR file and, so that a
    cached result never stands in for a compile, Triton's cache."""
    os.environ["TRITON_CACHE_DIR"] = str(workdir / "triton-cache")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences it
    import triton
    from triton.backends.compiler import GPUTarget

    path = workdir / f"{call.name}.ttir"
    path.write_text(call.ttir)
    kernel = triton.compile(str(path), target=GPUTarget("hip", arch, WAVEFRONT),
                            options={"num_warps": call.num_warps,
                                     "num_stages": call.num_stages})
    return Compiled(name=call.name, arch=arch, hsaco_bytes=len(kernel.asm["hsaco"]),
                    shared_bytes=int(kernel.metadata.shared), num_warps=call.num_warps,
                    num_stages=call.num_stages)


def _spec(shape: tuple[int, ...], dtype: Any = jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def step_shapes(t: int, s: int, p: int, page: int, decode_only: bool) -> AttentionMetadata:
    """Metadata of bucket shapes only: a step of T tokens, S sequences, P pages each."""
    return AttentionMetadata(positions=_spec((t,)), slot_mapping=_spec((t,)),
                             token_seq=_spec((t,)), query_start=_spec((s + 1,)),
                             seq_lens=_spec((s,)), page_table=_spec((s, p)),
                             num_tokens=_spec(()), page_size=page, decode_only=decode_only)


def preset_steps(preset: str) -> tuple[Any, list[AttentionMetadata]]:
    """The preset's RocmBackend, compiled not interpreted, and its steps at 4k tokens of
    context: decodes of a full batch (one split a sequence), decodes of 4 sequences (split),
    and a prompt step of a whole chunk over every sequence bucket (the ragged kernel, and
    the decode kernel for its decodes)."""
    from backends.rocm.backend import RocmBackend
    from engine.config import EngineConfig

    cfg = EngineConfig.build(preset)
    backend = RocmBackend({**dict(cfg.backend.options), "interpret": False})
    page = cfg.cache.page_size
    seqs = cfg.scheduler.max_running_requests
    p = 4096 // page
    return backend, [step_shapes(seqs, seqs, p, page, True), step_shapes(4, 4, p, page, True),
                     step_shapes(cfg.scheduler.chunked_prefill_size, seqs, p, page, False)]


def backend_kernels(backend: Any, steps: list[AttentionMetadata]) -> list[TritonCall]:
    """The distinct Triton kernels of `backend.attention` over `steps`, lowered for ROCm."""
    hq, hkv, d = HEADS
    cache = _spec((hkv, NUM_PAGES, steps[0].page_size, d), jnp.bfloat16)
    calls: dict[str, TritonCall] = {}
    for md in steps:
        q = _spec((md.positions.shape[0], hq, d), jnp.bfloat16)
        lowered = jax.jit(lambda q, k, v, md: backend.attention(q, k, v, md, scale=d**-0.5)
                          ).trace(q, cache, cache, md).lower(lowering_platforms=("rocm",))
        calls.update({c.name: c for c in triton_calls(lowered)})
    return list(calls.values())


def main(argv: list[str]) -> None:
    for preset in argv or PRESETS:
        backend, steps = preset_steps(preset)
        with tempfile.TemporaryDirectory() as tmp:
            for call in backend_kernels(backend, steps):
                c = compile_call(call, backend.target.arch, Path(tmp))
                print(f"{preset:12} {c.arch:7} {c.name:36} warps {c.num_warps} stages "
                      f"{c.num_stages}  LDS {c.shared_bytes / 1024:6.1f} KiB  code object "
                      f"{c.hsaco_bytes / 1000:5.1f} KB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
