"""SmolLM2-135M-Instruct (the default GGUF) with quantized projections, against float32.

- GGUF blocks kept (--quantization gguf), and float32 weights laid out for the kernel
  (--quantization f32), through the CPU kernel: the same logits as the float32 oracle (the
  file's blocks dequantized at load, plain JAX), and the same greedy tokens; with the CPU
  attention kernel too (all 8 texts in one ragged prompt step, then one decode step of 8
  rows): the same logits and greedy tokens.
- int8 weight-only per channel (--quantization int8), and the GGUF blocks, as the CPU backend
  runs them by default (integer activations): top-1 agreement and logit error bounded.
- fp8 (--quantization fp8) through the reference path (weight-only) and as the GPU runs it
  (W8A8: activations quantized per token, quant.w8a8_reference), and int4 (group-wise, 128):
  top-1 agreement and logit error bounded, with the measured figures in the tests.
Each of 8 varied texts is cut to 32 tokens; the next-token prediction at every position is
compared (teacher-forced greedy: the float32 model's input at each step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.cpu.attention import ragged_paged_attention
from backends.cpu.backend import CpuBackend
from backends.cpu.kernels import attention as attn_kernels
from backends.cpu.kernels import linear as kernels
from engine.attention import AttentionMetadata
from engine.loader.load import load_checkpoint
from engine.loader.quantize import quantize_params
from engine.model.llama import forward
from engine.model.quant import QuantizedWeight, reference_linear, w8a8_reference
from engine.model.weights import fuse_qkv, params_from_hf

TEXTS = [
    "The capital of France is Paris, a city known for the Eiffel Tower, the Louvre and its cafes "
    "along the Seine, where visitors walk for hours.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nprint([fibonacci(i) for i in range(10)])",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "woodcutter and his three curious children, who loved to explore the hills.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the boiling point "
    "is lower because the air pressure drops as you climb higher into the mountains.",
    "Translate to French: Good morning, my friend. How are you today? I hope the weather is nice "
    "where you live, and that your family is well and happy this spring.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and release oxygen into the air that all animals and people need to breathe.",
    "<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\n"
    "The three primary colors are red, blue and yellow. Mixing them gives the other colors.",
]
N = 32
PAGE = 16


@pytest.fixture(scope="module")
def models(default_gguf, default_tokenizer):
    ckpt = load_checkpoint(str(default_gguf), progress=False)
    cfg = ckpt.config

    def params(method: str | None) -> dict:
        p = params_from_hf(ckpt.tensors, cfg, jnp.float32, scan=True)
        fuse_qkv(p)
        return p if method is None else quantize_params(p, cfg, method, default_gguf)

    ids = [default_tokenizer.encode(t)[:N] for t in TEXTS]
    assert all(len(i) == N for i in ids)
    return cfg, ids, {m: params(m) for m in (None, "int8", "gguf", "f32", "fp8", "int4")}


def logits(cfg, params, ids: list[list[int]], linear) -> np.ndarray:
    """Next-token logits [texts, N, V] of each text run as one sequence (one prompt step)."""
    pages = N // PAGE + 1
    kv0 = jax.tree.map(lambda a: jnp.zeros_like(a), _kv(cfg, pages))
    fwd = jax.jit(functools.partial(
        forward, cfg=cfg, linear=linear,
        attend=functools.partial(ragged_paged_attention, scale=cfg.head_dim**-0.5)))
    md = AttentionMetadata.one_sequence(0, N, np.arange(pages, dtype=np.int32)[None],
                                        PAGE, pages)
    out = []
    for seq in ids:
        tok = np.zeros(md.positions.shape[0], np.int32)
        tok[:N] = seq
        out.append(np.asarray(fwd(params, kv0, tok, md, np.arange(N, dtype=np.int32))[0]))
    return np.stack(out)


def _kv(cfg, pages: int):
    shape = (cfg.num_layers, pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


@pytest.fixture(scope="module")
def oracle(models):
    cfg, ids, params = models
    return logits(cfg, params[None], ids, reference_linear)


def test_projections_are_quantized(models):
    _, _, params = models
    lp = params["gguf"]["layers"]
    assert isinstance(lp["wqkv"], QuantizedWeight) and lp["wqkv"].fmt == "q4_1"
    assert params["gguf"]["embed"].fmt == "q8_0"  # token_embd is Q8_0 in this file
    assert {params["int8"]["layers"][n].fmt for n in ("wqkv", "wo", "w_gate", "w_down")} == {"int8"}


@pytest.mark.skipif(kernels.isa_level() < 0, reason="the CPU kernel library is not built here")
@pytest.mark.parametrize("method", ["gguf", "f32"])
def test_kernel_path_equals_float32_oracle(models, oracle, method):
    """The Q4_1 blocks kept, or the float32 weights laid out for the kernel: every
    projection through the kernel, the same logits and greedy tokens as the oracle."""
    cfg, ids, params = models
    isa = kernels.isa_level()
    got = logits(cfg, params[method], ids, functools.partial(kernels.kernel, isa=isa))
    np.testing.assert_allclose(got, oracle, atol=2e-3, rtol=1e-3)
    assert (got.argmax(-1) == oracle.argmax(-1)).all()


def _ragged_step(cfg, params, kv, tokens: list[list[int]], start: int, page_table, linear,
                 attend) -> tuple[np.ndarray, tuple]:
    """One step of every sequence's tokens [start, start + len) (sequence s's K/V in pages
    page_table[s]); logits [sum of lengths, V] of every token, and the updated cache."""
    lens = [len(t) for t in tokens]
    n = sum(lens)
    t_pad = -(-n // 16) * 16
    pos = np.zeros(t_pad, np.int32)
    seq = np.zeros(t_pad, np.int32)
    ids = np.zeros(t_pad, np.int32)
    slots = np.full(t_pad, page_table.size * PAGE, np.int32)  # padding: past the last slot
    off = 0
    for s, toks in enumerate(tokens):
        p = np.arange(start, start + len(toks))
        pos[off:off + len(toks)], seq[off:off + len(toks)] = p, s
        ids[off:off + len(toks)] = toks
        slots[off:off + len(toks)] = page_table[s, p // PAGE] * PAGE + p % PAGE
        off += len(toks)
    md = AttentionMetadata(
        positions=pos, slot_mapping=slots, token_seq=seq,
        query_start=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
        seq_lens=np.full(len(tokens), start + max(lens), np.int32), page_table=page_table,
        num_tokens=np.int32(n), page_size=PAGE, decode_only=all(x == 1 for x in lens))
    fwd = jax.jit(functools.partial(forward, cfg=cfg, linear=linear, attend=functools.partial(
        attend, scale=cfg.head_dim**-0.5)))
    out, kv = fwd(params, kv, ids, md, np.arange(n, dtype=np.int32))
    return np.asarray(out), kv


@pytest.mark.skipif(attn_kernels.isa_level() < 0,
                    reason="the CPU kernel library is not built here")
def test_attention_kernel_equals_float32_oracle(models, oracle):
    """Float32 weights through the linear kernel and the attention kernel (layers stacked:
    the kernel reads the [L, ...] cache in place at a traced layer): the 8 texts' first 31
    tokens as one ragged prompt step (2 pages each), then their 32nd tokens as one decode
    step of 8 rows: the oracle's logits (one sequence at a time, plain JAX) and greedy
    tokens at all 32 positions."""
    cfg, ids, params = models
    table = np.arange(2 * len(ids), dtype=np.int32).reshape(len(ids), 2)[::-1].copy()
    kv = _kv(cfg, table.size)
    linear = functools.partial(kernels.kernel, isa=kernels.isa_level())
    attend = functools.partial(attn_kernels.kernel, isa=attn_kernels.isa_level())
    prompt, kv = _ragged_step(cfg, params["f32"], kv, [i[:N - 1] for i in ids], 0, table,
                              linear, attend)
    decode, _ = _ragged_step(cfg, params["f32"], kv, [i[N - 1:] for i in ids], N - 1, table,
                             linear, attend)
    got = np.concatenate([prompt.reshape(len(ids), N - 1, -1), decode[:, None]], axis=1)
    np.testing.assert_allclose(got, oracle, atol=2e-3, rtol=1e-3)
    assert (got.argmax(-1) == oracle.argmax(-1)).all()


@pytest.mark.parametrize("method", ["int8", "gguf"])
def test_backend_default_agrees_with_float32(models, oracle, method):
    """What the CPU backend runs by default for int8 and GGUF weights (the kernel with
    activations quantized per block of 32 and integer dots; plain JAX without the library):
    greedy tokens agree with float32 at most positions, logit error bounded. Per call the
    kernel equals its plain-JAX emulation to float rounding (tests/backends/cpu); through 30
    layers the two drift apart as much as either does from float32, because SmolLM2's
    residual stream has outliers (up to ~14000) whose blocks quantize with steps of ~100, so
    a rounding flip upstream moves an input by a whole step."""
    cfg, ids, params = models
    got = logits(cfg, params[method], ids, CpuBackend().linear)
    agree = float((got.argmax(-1) == oracle.argmax(-1)).mean())
    err = np.abs(got - oracle).max(-1) / np.abs(oracle).max(-1)  # per position, relative
    # Measured 2026-12-03 (integer activations, AVX-512 VNNI): int8 agreement 0.953 (244 of
    # 256), relative max logit error median 0.046, max 0.111; gguf (Q4_1 kept) 0.980 (251 of
    # 256), median 0.027, max 0.076. With float activations int8 measured 0.957 / 0.037.
    floor, median = {"int8": (0.85, 0.06), "gguf": (0.93, 0.04)}[method]
    assert agree >= floor, agree
    assert np.median(err) <= median and err.max() <= 0.2, (np.median(err), err.max())


@pytest.mark.skipif(kernels.isa_level() < 3, reason="packed weights need AVX-512 VNNI")
def test_packed_weights_compute_what_the_blocks_did(models):
    """The GGUF blocks packed for VNNI as the CPU backend packs them at load (q4_1x layers,
    the tied Q8_0 embedding and head as q8_0x, read back by the embedding gather): through
    the backend's linear, every logit of 32-token prompts bit for bit what the blocks gave
    (above 4 rows both run the same integer tiles in the same float order)."""
    cfg, ids, params = models
    backend = CpuBackend()
    packed = backend.prepare_weights(dict(params["gguf"], layers=dict(params["gguf"]["layers"])))
    assert packed["layers"]["wqkv"].fmt == "q4_1x" and packed["embed"].fmt == "q8_0x"
    want = logits(cfg, params["gguf"], ids[:2], backend.linear)
    np.testing.assert_array_equal(logits(cfg, packed, ids[:2], backend.linear), want)


# Measured 2026-12-03 (teacher-forced top-1 agreement with float32 over the 256 positions;
# relative max logit error per position, median and max):
#   fp8 weight-only (the reference path)   0.914   0.096  0.235
#   fp8 W8A8 (the GPU's arithmetic)        0.895   0.116  0.301
#   int4, groups of 64 (K=576), int8 head  0.738   0.397  0.881
# int4 here is round-to-nearest with no calibration, on a 135M model whose float weights are
# themselves Q4_1 blocks: AWQ/GPTQ checkpoints (calibrated) are the way to good int4.
@pytest.mark.parametrize("method,linear,floor,median", [
    ("fp8", reference_linear, 0.85, 0.15), ("fp8", w8a8_reference, 0.85, 0.15),
    ("int4", reference_linear, 0.65, 0.5)], ids=["fp8-weight-only", "fp8-w8a8", "int4"])
def test_fp8_and_int4_agree_with_float32(models, oracle, method, linear, floor, median):
    cfg, ids, params = models
    got = logits(cfg, params[method], ids, linear)
    agree = float((got.argmax(-1) == oracle.argmax(-1)).mean())
    err = np.abs(got - oracle).max(-1) / np.abs(oracle).max(-1)  # per position, relative
    assert agree >= floor, agree
    assert np.median(err) <= median, np.median(err)
