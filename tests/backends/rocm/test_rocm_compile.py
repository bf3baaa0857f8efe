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
from backends.rocm.triton_check import Compiled, TritonCall, compile_call, triton_calls
from engine.attention import AttentionMetadata
from engine.config import EngineConfig

PRESETS = {"rocm-mi300x": "gfx942", "rocm-mi355x": "gfx950"}
HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B's attention
NUM_PAGES = 8192


def spec(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


def step_md(t: int, s: int, p: int, page: int, decode_only: bool) -> AttentionMetadata:
    """Bucket shapes only (a step of T tokens, S sequences, P pages each)."""
    return AttentionMetadata(positions=spec((t,)), slot_mapping=spec((t,)),
                             token_seq=spec((t,)), query_start=spec((s + 1,)),
                             seq_lens=spec((s,)), page_table=spec((s, p)),
                             num_tokens=spec(()), page_size=page, decode_only=decode_only)


def preset_steps(preset: str) -> tuple[RocmBackend, list[AttentionMetadata]]:
    """The preset's backend, compiled not interpreted, and its steps: decodes of a full batch
    (one split a sequence), decodes of few long sequences (split), and a wide prompt step
    (the ragged kernel; its decodes through the decode kernel), at 4k tokens of context."""
    cfg = EngineConfig.build(preset)
    backend = RocmBackend({**dict(cfg.backend.options), "interpret": False})
    page = cfg.cache.page_size
    seqs = cfg.scheduler.max_running_requests
    chunk = cfg.scheduler.chunked_prefill_size
    p = 4096 // page
    return backend, [step_md(seqs, seqs, p, page, True), step_md(4, 4, p, page, True),
                     step_md(chunk, seqs, p, page, False)]


def lower_steps(backend: RocmBackend, steps: list[AttentionMetadata]) -> list[TritonCall]:
    """The distinct Triton kernels of the backend's attention over `steps`, for ROCm."""
    cache = spec((HKV, NUM_PAGES, steps[0].page_size, D), jnp.bfloat16)
    calls = {}
    for md in steps:
        q = spec((md.positions.shape[0], HQ, D), jnp.bfloat16)
        lowered = jax.jit(lambda q, k, v, md: backend.attention(q, k, v, md, scale=D**-0.5)
                          ).trace(q, cache, cache, md).lower(lowering_platforms=("rocm",))
        calls.update({c.name: c for c in triton_calls(lowered)})
    return list(calls.values())


def compile_preset(preset: str, tmp_path) -> list[Compiled]:
    backend, steps = preset_steps(preset)
    return [compile_call(c, PRESETS[preset], tmp_path) for c in lower_steps(backend, steps)]


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
        # Triton's AMD pipeliner fits its stages into the LDS; tiles too large
        # even so come out over the bound (ragged 256 x 256 tiles, 3 stages: 2026-12-03).
        assert 0 < c.shared_bytes <= backend.target.lds_bytes, c
        assert c.num_warps == backend.decode_sizes.num_warps or c.name.startswith("ragged")
    stages = {c.name.startswith("gqa"): c.num_stages for c in out}
    assert stages == {True: backend.decode_sizes.gqa_num_stages,
                      False: backend.prefill_sizes.num_stages}


@pytest.mark.parametrize("arch", list(PRESETS.values()))
def test_jax_decode_kernel_compiles(arch, tmp_path):
    """decode_impl: jax (JAX's paged_attention) is the backend's other decode kernel."""
    backend = RocmBackend({"interpret": False, "target": arch, "decode_impl": "jax"})
    (call,) = lower_steps(backend, [step_md(4, 4, 256, 16, True)])
    assert call.name.startswith("paged_attention_block_h_16")
    out = compile_call(call, arch, tmp_path)
    assert 0 < out.shared_bytes <= backend.target.lds_bytes
    assert out.num_stages == backend.decode_sizes.num_stages


def test_a_kernel_that_cannot_compile_fails(tmp_path):
    """The check is real: IR Triton rejects raises, rather than passing quietly."""
    _, steps = preset_steps("rocm-mi300x")
    backend = RocmBackend({"interpret": False, "target": "gfx942"})
    cache = spec((HKV, NUM_PAGES, 16, D), jnp.bfloat16)
    q = spec((steps[1].positions.shape[0], HQ, D), jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v, md: backend.attention(q, k, v, md, scale=0.1)
                      ).trace(q, cache, cache, steps[1]).lower(lowering_platforms=("rocm",))
    call = triton_calls(lowered)[0]
    broken = type(call)(name=call.name, ttir=call.ttir.replace("tt.dot", "tt.not_an_op", 1),
                        num_warps=call.num_warps, num_stages=call.num_stages)
    assert broken.ttir != call.ttir
    with pytest.raises(Exception, match="Parse MLIR"):
        compile_call(broken, "gfx942", tmp_path)
