"""The GPU's quantized kernels compile for Hopper on a host without a GPU: each lowered by
jax for platform "cuda" (Pallas' Triton lowering runs here: an op it cannot lower fails at
this step, as an f8 masked load's fill value once did on the H200) and its Triton IR compiled
by PyPI Triton's NVIDIA backend for sm_90 (H100/H200) down to a cubin. A proxy: XLA compiles
on the GPU with the Triton pinned in jaxlib."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from backends.gpu.backend import TritonBackend
from backends.gpu.kernels import quant_linear as ql
from backends.rocm.triton_check import step_shapes, triton_calls
from engine.model.quant import QuantizedWeight

S = jax.ShapeDtypeStruct


def cubins(lowered, tmp_path) -> dict[str, int]:
    """Kernel name -> cubin bytes, for every Pallas kernel of a `Lowered`."""
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # never a cached result
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    out = {}
    for call in triton_calls(lowered):
        path = tmp_path / f"{call.name}.ttir"
        path.write_text(call.ttir)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": call.num_warps,
                                         "num_stages": call.num_stages})
        out[call.name] = len(kernel.asm["cubin"])
    return out


def weight(fmt: str, n: int, k: int, groups: int = 0) -> QuantizedWeight:
    if fmt == "fp8":
        scales = S((n, groups), jnp.float32) if groups else S((n,), jnp.float32)
        return QuantizedWeight(S((n, k), jnp.float8_e4m3fn), scales, "fp8", (k,), (n,))
    if fmt == "int8":
        return QuantizedWeight(S((n, k), jnp.int8), S((n,), jnp.float32), "int8", (k,), (n,))
    return QuantizedWeight(S((n, k // 2), jnp.uint8), S((n, groups), jnp.float32), "int4",
                           (k,), (n,), S((n, groups), jnp.float32))


# (format, M, K, N, groups, fp8_gemm, kernel name prefix): decode rows (M=1: the weight-only
# kernels' GEMV mode; masked rows), a ragged shape off every tile, block-scaled fp8 (128-wide
# groups), int4 in groups of 128 at 1 and 3 rows, fp8 weight-only on tensor cores (M=8).
CASES = [("fp8", 1, 4096, 1024, 0, "pallas", "w8a8"), ("fp8", 70, 200, 130, 0, "pallas", "w8a8"),
         ("fp8", 8, 512, 256, 4, "auto", "w8a8"), ("fp8", 1, 4096, 1024, 0, "auto", "woq_fp8"),
         ("fp8", 8, 4096, 1000, 0, "weight_only", "woq_fp8"),
         ("int8", 1, 4096, 1024, 0, "auto", "woq"), ("int4", 1, 1024, 500, 8, "auto", "woq"),
         ("int4", 3, 1024, 512, 8, "auto", "woq")]


@pytest.mark.parametrize("fmt,m,k,n,groups,fp8_gemm,prefix", CASES)
def test_quantized_linear_compiles_for_sm90(fmt, m, k, n, groups, fp8_gemm, prefix, tmp_path):
    x, w = S((m, k), jnp.bfloat16), weight(fmt, n, k, groups)
    lowered = jax.jit(lambda x, w: ql.quant_linear(x, w, fp8_gemm=fp8_gemm)).trace(
        x, w).lower(lowering_platforms=("cuda",))
    out = cubins(lowered, tmp_path)
    if prefix == "woq":
        prefix = f"woq_{fmt}"
    assert out and all(name.startswith(prefix) for name in out), out
    assert all(size > 1000 for size in out.values()), out


@pytest.mark.parametrize("decode_only", [True, False])
def test_attention_on_an_fp8_cache_compiles_for_sm90(decode_only, tmp_path):
    backend = TritonBackend({"interpret": False})  # the CUDA tuning; no GPU check
    hq, hkv, d, page = 32, 8, 128, 16
    md = step_shapes(8 if decode_only else 64, 8, 64, page, decode_only)
    cache = S((hkv, 256, page, d), jnp.float8_e4m3fn)
    q = S((md.positions.shape[0], hq, d), jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v, md: backend.attention(q, k, v, md, scale=d**-0.5)
                      ).trace(q, cache, cache, md).lower(lowering_platforms=("cuda",))
    out = cubins(lowered, tmp_path)
    assert any(name.startswith("gqa_decode") for name in out), out
    if not decode_only:
        assert any(not name.startswith("gqa_decode") for name in out), out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_kv_write_compiles_for_sm90(dtype, tmp_path):
    """One kernel writes a layer's K and V (kernels/kv_write.py), bf16 and fp8 caches."""
    backend = TritonBackend({"interpret": False})
    cache, kv = S((8, 256, 16, 128), dtype), S((1, 8, 128), jnp.bfloat16)
    lowered = jax.jit(backend.write_kv).trace(cache, cache, kv, kv, S((1,), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    out = cubins(lowered, tmp_path)
    assert list(out) == ["kv_write"] and out["kv_write"] > 1000, out


@pytest.mark.parametrize("e", [4096, 8192])
def test_add_rms_norm_compiles_for_sm90(e, tmp_path):
    """A residual add and its RMSNorm in one kernel (kernels/add_norm.py), bf16 rows."""
    backend = TritonBackend({"interpret": False})
    x = S((1, e), jnp.bfloat16)
    lowered = jax.jit(backend.add_rms_norm, static_argnums=3).trace(
        x, x, S((e,), jnp.bfloat16), 1e-5).lower(lowering_platforms=("cuda",))
    out = cubins(lowered, tmp_path)
    assert list(out) == ["add_rms_norm"] and out["add_rms_norm"] > 1000, out
