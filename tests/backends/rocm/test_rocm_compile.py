"""Every Triton kernel the ROCm backend uses compiles for its preset's AMD target, on a host
without ROCm: the backend's attention lowered for platform "rocm" at the preset's bucket
shapes, and each kernel's Triton IR compiled by Triton's AMD backend for gfx942 (MI300X)
and gfx950 (MI355X), within the target's LDS. A kernel that stops compiling fails here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import triton  # noqa: F401  (the test extra pins it; its AMD backend compiles here)

from backends.rocm.backend import RocmBackend
from backends.rocm.triton_check import PRESETS as PRESET_NAMES
from backends.rocm.triton_check import (
    Compiled,
    backend_kernels,
    compile_call,
    preset_steps,
    step_shapes,
    triton_calls,
)

PRESETS = {"rocm-mi300x": "gfx942", "rocm-mi355x": "gfx950"}
assert set(PRESETS) == set(PRESET_NAMES)


def compile_preset(preset: str, tmp_path) -> list[Compiled]:
    backend, steps = preset_steps(preset)
    return [compile_call(c, PRESETS[preset], tmp_path) for c in backend_kernels(backend, steps)]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_kernels_compile_for_its_target(preset, tmp_path):
    backend, _ = preset_steps(preset)
    assert backend.target.arch == PRESETS[preset]
    out = compile_preset(preset, tmp_path)
    names = sorted(c.name for c in out)
    bq, bk = backend.prefill_sizes.block_q, backend.prefill_sizes.block_k
    # One decode kernel without splits, one with, and the ragged kernel at the tuned blocks.
    assert sum(n.startswith("gqa_decode_ks1_") for n in names) == 1, names
    assert any(n.startswith("gqa_decode_ks") and not n.startswith("gqa_decode_ks1_")
               for n in names), names
    assert f"ragged_paged_attention_bq{bq}_bk{bk}" in names, names
    for c in out:
        assert c.hsaco_bytes > 0
        # Triton's AMD pipeliner drops stages to fit the LDS, but larger tiles can exceed it
        # (ragged 256 x 256 tiles, 3 stages, 8 warps did on gfx942: 2026-12-03).
        assert 0 < c.shared_bytes <= backend.target.lds_bytes, c
        assert c.num_warps == backend.decode_sizes.num_warps or c.name.startswith("ragged")
    stages = {c.name.startswith("gqa"): c.num_stages for c in out}
    assert stages == {True: backend.decode_sizes.gqa_num_stages,
                      False: backend.prefill_sizes.num_stages}


@pytest.mark.parametrize("arch", list(PRESETS.values()))
def test_jax_decode_kernel_compiles(arch, tmp_path):
    """decode_impl: jax (JAX's paged_attention) is the backend's other decode kernel."""
    backend = RocmBackend({"interpret": False, "target": arch, "decode_impl": "jax"})
    (call,) = backend_kernels(backend, [step_shapes(4, 4, 256, 16, True)])
    assert call.name.startswith("paged_attention_block_h_16")
    out = compile_call(call, arch, tmp_path)
    assert 0 < out.shared_bytes <= backend.target.lds_bytes
    assert out.num_stages == backend.decode_sizes.num_stages


def test_a_kernel_that_cannot_compile_fails(tmp_path):
    """The check is real: IR Triton rejects raises, rather than passing quietly."""
    backend = RocmBackend({"interpret": False, "target": "gfx942"})
    (call,) = backend_kernels(backend, [step_shapes(4, 4, 256, 16, True)])
    broken = type(call)(name=call.name, ttir=call.ttir.replace("tt.dot", "tt.not_an_op", 1),
                        num_warps=call.num_warps, num_stages=call.num_stages)
    assert broken.ttir != call.ttir
    with pytest.raises(Exception, match="Parse MLIR"):
        compile_call(broken, "gfx942", tmp_path)


@pytest.mark.parametrize("arch", list(PRESETS.values()))
def test_kv_write_and_add_norm_kernels_compile(arch, tmp_path):
    """The GPU backends' one-kernel K/V write and fused add+RMSNorm, shared with CUDA."""
    backend = RocmBackend({"interpret": False, "target": arch})
    S = jax.ShapeDtypeStruct
    cache, kv, x = S((8, 256, 16, 128), jnp.bfloat16), S((1, 8, 128), jnp.bfloat16), \
        S((1, 4096), jnp.bfloat16)

    def step(kc, vc, k, v, slots, x, w):
        return backend.write_kv(kc, vc, k, v, slots), backend.add_rms_norm(x, x, w, 1e-5)

    lowered = jax.jit(step).trace(cache, cache, kv, kv, S((1,), jnp.int32), x,
                                  S((4096,), jnp.bfloat16)).lower(lowering_platforms=("rocm",))
    out = [compile_call(c, arch, tmp_path) for c in triton_calls(lowered)]
    assert sorted(c.name for c in out) == ["add_rms_norm", "kv_write"]
    assert all(c.hsaco_bytes > 0 for c in out)


FP8_ARCHS = {"gfx942": jnp.float8_e4m3fnuz, "gfx950": jnp.float8_e4m3fn}
"""Each target's FP8 (fp8_type auto): MI300's e4m3fnuz, MI350's OCP e4m3fn."""


@pytest.mark.parametrize("arch", list(FP8_ARCHS))
def test_fp8_kernels_compile_in_the_targets_fp8(arch, tmp_path):
    """The W8A8 GEMM (an FP8 dot of the target's e4m3), the weight-only fp8 GEMM and the
    decode and ragged kernels over an fp8 KV cache, in the target's e4m3: on gfx942 fnuz,
    which jax's Pallas cannot cast (the kernels decode its bits: kernels/fp8.py). Measured
    2026-12-04: gfx942's W8A8 code object is 8 KB in fnuz, 47 KB in e4m3fn (no e4m3fn
    MFMA on MI300)."""
    from backends.gpu.kernels import quant_linear as ql
    from engine.model.quant import QuantizedWeight

    dt = FP8_ARCHS[arch]
    backend = RocmBackend({"interpret": False, "target": arch})
    assert backend.fp8_dtype == dt  # auto, from the target on a host without the GPU
    S = jax.ShapeDtypeStruct
    m, k, n = 16, 4096, 4096
    w = QuantizedWeight(S((n, k), dt), S((n,), jnp.float32), "fp8", (k,), (n,))

    def gemms(xq, sx, x, w):
        return (ql.w8a8_pallas(xq, sx, w.data, w.scales, out_dtype=jnp.bfloat16),
                ql.woq_pallas(x, w))

    lowered = [jax.jit(gemms).trace(S((m, k), dt), S((m,), jnp.float32),
                                    S((1, k), jnp.bfloat16), w).lower(lowering_platforms=("rocm",))]
    hkv, d = 8, 128
    cache = S((hkv, 1024, 16, d), dt)
    for md in (step_shapes(4, 4, 64, 16, True), step_shapes(256, 4, 64, 16, False)):
        q = S((md.positions.shape[0], 32, d), jnp.bfloat16)
        lowered.append(jax.jit(lambda q, kc, vc, md: backend.attention(q, kc, vc, md,
                                                                       scale=d**-0.5))
                       .trace(q, cache, cache, md).lower(lowering_platforms=("rocm",)))
    out = {c.name: compile_call(c, arch, tmp_path) for lo in lowered for c in triton_calls(lo)}
    assert {n.split("_bm")[0].split("_ks")[0] for n in out} == {
        "w8a8", "woq_fp8", "gqa_decode", "ragged_paged_attention_bq128_bk64"}, sorted(out)
    for c in out.values():
        assert c.hsaco_bytes > 0 and 0 < c.shared_bytes <= backend.target.lds_bytes, c
