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
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

TRITON_CALL = "__gpu$xla.gpu.triton"
WAVEFRONT = 64


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
