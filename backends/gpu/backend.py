"""The GPU backends' common part (CUDA and ROCm): bf16, head-major paged KV cache, the
Pallas (Triton) attention kernels of backends/gpu/kernels with a target's tuning.

Decode-only steps take our Pallas decode kernel (kernels/gqa_decode.py); steps with prompt
chunks take the ragged paged-attention kernel (kernels/ragged_prefill.py) for their chunks
and, when both kernels are on, the decode kernel for their decodes (sequences with one
query token), on which the ragged kernel would spend a whole query block each; in small
steps (a speculative verification: a decode and its drafts) sequences of a few query tokens
take the decode kernel too, a kernel row per token.
Shapes Triton cannot tile (head dim or page size not a power of two) take the plain-JAX
ragged attention, which is correct for any mixed batch but slow for long prompts.

Options (YAML `backend:` section): interpret (true: run the Pallas kernels in the
interpreter on the CPU, for tests on a host without a GPU; CLI --interpret),
decode_kernel (false: plain JAX for decodes), prefill_kernel (false: plain JAX for steps
with prompt tokens), mixed_decode (false: the ragged kernel takes the decodes of a step with
prompt tokens too), verify_decode (false: sequences of a few query tokens, such as a
speculative verification's, take the ragged kernel in small steps too), decode_impl ("gqa",
the default: ours, kernels/gqa_decode.py; "jax": JAX's paged_attention,
kernels/paged_decode.py), fp8_gemm (the GEMM of fp8 weights:
"auto", the default: weight-only up to quant_tuning.FP8_WEIGHT_ONLY_MAX_M rows (1: the
H200 sweep of 2026-12-03 found it tied with W8A8 at one row and slower at 8), then
W8A8 through ours up to 64 rows and XLA's (cuBLASLt FP8) above; "pallas": W8A8, ours,
kernels/quant_linear.py; "xla": W8A8, XLA's; "weight_only": bf16 activations, ours),
kv_write ("pallas", the default: K and V of a layer written by one kernel,
kernels/kv_write.py, on one device with power-of-two heads and head dim; "xla": XLA's two
scatters), add_norm ("pallas", the default: each residual add and the RMSNorm after it in
one kernel, kernels/add_norm.py, for steps of up to 64 tokens on one device; "xla": the
model's plain JAX, two kernels).

Quantized weights (engine.model.quant): fp8 runs W8A8 (activations quantized per token)
except at decode-sized steps (above), int8 and int4 weight-only through the fused
dequantize-GEMM for decode-sized steps and XLA's dot on the weight dequantized to bf16 above
(kernels/quant_linear.py). An fp8 KV cache (--kv-cache-dtype fp8) is written clipped and
read upcast by every attention kernel here (decode_impl "jax" excepted).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from backends.cpu.attention import ragged_paged_attention
from backends.gpu.kernels import add_norm, kv_write, quant_linear, ragged_prefill
from backends.gpu.kernels.paged_decode import (
    DECODE_SIZES,
    DecodeSizes,
    decode_attention,
    paged_decode_attention,
)
from engine.attention import AttentionMetadata
from engine.backend import Backend, Capabilities, MemoryInfo, device_memory
from engine.model.quant import QuantizedWeight

SHORT_QUERY = 8
"""Query tokens of a sequence (a decode and its speculative drafts) up to which a mixed step
of at most PER_TOKEN_MAX_TOKENS tokens runs it through the decode kernel, a row per token."""
PER_TOKEN_MAX_TOKENS = 256
"""The largest token bucket taking that path: the per-token page table is [T, P]."""


class TritonBackend(Backend):
    """A subclass names itself and gives its kernels' tuning: `decode_sizes` and
    `prefill_sizes` (the CUDA figures by default)."""

    name = "triton"
    decode_sizes: DecodeSizes = DECODE_SIZES
    prefill_sizes: ragged_prefill.BlockSizes = ragged_prefill.BLOCK_SIZES

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        # Interpreting is asked for, never a fallback: without it the GPU must be present.
        self.interpret = self.options.get("interpret", False)
        if not isinstance(self.interpret, bool):
            raise ValueError(f"backend option interpret must be true (the Pallas interpreter "
                             f"on the CPU) or false (run on the GPU), got {self.interpret!r}")
        self.decode_kernel = bool(self.options.get("decode_kernel", True))
        self.prefill_kernel = bool(self.options.get("prefill_kernel", True))
        self.mixed_decode = bool(self.options.get("mixed_decode", True)) and self.decode_kernel
        self.verify_decode = bool(self.options.get("verify_decode", True)) and self.mixed_decode
        self.decode_impl = str(self.options.get("decode_impl", "gqa"))
        if self.decode_impl not in ("jax", "gqa"):
            raise ValueError(f"backend option decode_impl={self.decode_impl!r}: expected "
                             f"'jax' (JAX's paged_attention) or 'gqa' (ours)")
        self.fp8_gemm = str(self.options.get("fp8_gemm", "auto"))
        if self.fp8_gemm not in quant_linear.FP8_GEMMS:
            raise ValueError(f"backend option fp8_gemm={self.fp8_gemm!r}: expected one of "
                             f"{', '.join(quant_linear.FP8_GEMMS)}")
        self.kv_write = str(self.options.get("kv_write", "pallas"))
        if self.kv_write not in ("pallas", "xla"):
            raise ValueError(f"backend option kv_write={self.kv_write!r}: expected 'pallas' "
                             f"(one kernel writes K and V) or 'xla' (two scatters)")
        self.add_norm = str(self.options.get("add_norm", "pallas"))
        if self.add_norm not in ("pallas", "xla"):
            raise ValueError(f"backend option add_norm={self.add_norm!r}: expected 'pallas' "
                             f"(one kernel for a residual add and its norm) or 'xla'")
        platform = "cpu" if self.interpret else "gpu"
        self.capabilities = Capabilities(platform=platform, default_dtype="bfloat16",
                                         scan_layers=False, spmd_attention=False, fp8_kv=True,
                                         min_seq_bucket=16)

    def options_for(self, params: Any) -> dict[str, Any]:
        """With fp8 weights, XLA's Triton GEMMs off, so that the FP8 dots of prompt-sized
        steps go to cuBLASLt's FP8 matmul without XLA autotuning Triton configurations for
        each: on an H200 (2026-12-04, 8B shape) that autotuning took 206 s for the one
        program of the start-up memory probe and up to 100 s for each of the warm-up's FP8
        programs (the warm-up did not finish in 6 minutes); without it the probe took
        7.8 s and the whole warm-up (32 programs) 44 s. The quantized kernels are Pallas
        calls, which the option leaves alone. Other weights: XLA's defaults."""
        fp8 = any(isinstance(w, QuantizedWeight) and w.fmt == "fp8" for w in jax.tree.leaves(
            params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
        return {"xla_gpu_enable_triton_gemm": False} if fp8 else {}

    def memory_info(self) -> MemoryInfo:
        return device_memory(self.model_devices())

    def kv_cache_axes(self) -> tuple[str, ...]:
        return ("kv_heads", "pages", "page", "head_dim")

    def kv_cache_shape(self, num_pages: int, page_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_pages, page_size, head_dim)

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slots: jax.Array, layer: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        if layer is not None:
            raise ValueError(f"the {self.name} backend runs unrolled layers "
                             f"(scan_layers: false)")
        hkv, _, _, d = k_cache.shape
        # The kernel is opaque to the SPMD partitioner: under a mesh XLA's scatters stay.
        if self.kv_write == "pallas" and self.mesh is None and kv_write.supported(hkv, d):
            return kv_write.write_kv(k_cache, v_cache, k, v, slots, interpret=self.interpret)
        return kv_write.reference(k_cache, v_cache, k, v, slots)

    def add_rms_norm(self, x: jax.Array, y: jax.Array, w: jax.Array, eps: float
                     ) -> tuple[jax.Array, jax.Array]:
        if self.add_norm == "pallas" and self.mesh is None and add_norm.supported(*x.shape):
            return add_norm.add_rms_norm(x, y, w, eps, interpret=self.interpret)
        return add_norm.reference(x, y, w, eps)

    def linear(self, x: jax.Array, w: QuantizedWeight) -> jax.Array:
        return quant_linear.quant_linear(x, w, fp8_gemm=self.fp8_gemm, interpret=self.interpret,
                                         sharded=self.mesh is not None)

    def attention(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                  md: AttentionMetadata, *, scale: float, layer: jax.Array | None = None,
                  ) -> jax.Array:
        if md.decode_only and self.decode_kernel:
            return paged_decode_attention(q, k_cache, v_cache, md, scale=scale,
                                          interpret=self.interpret, impl=self.decode_impl,
                                          sizes=self.decode_sizes)
        _, _, page, d = k_cache.shape
        if (not md.decode_only and self.prefill_kernel
                and ragged_prefill.supported(d, page)):
            if self.mixed_decode:
                return self.mixed_attention(q, k_cache, v_cache, md, scale=scale)
            return ragged_prefill.ragged_paged_attention(q, k_cache, v_cache, md, scale=scale,
                                                         interpret=self.interpret,
                                                         sizes=self.prefill_sizes)
        return ragged_paged_attention(q, k_cache, v_cache, md, scale=scale, head_major=True)

    def mixed_attention(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        md: AttentionMetadata, *, scale: float) -> jax.Array:
        """A step with prompt tokens: its decodes through the decode kernel (the others'
        lengths set to 0, so it does no work for them), the rest through the ragged one.
        In a step of at most PER_TOKEN_MAX_TOKENS tokens (a static bound: the step's token
        bucket), sequences of up to SHORT_QUERY query tokens (speculative verification: a
        decode and its drafts) take the decode kernel too, one kernel row per token: the
        token at position p attends to the sequence's first p + 1 K/V entries (the causal
        mask), so the ragged kernel spends no query block of mostly padding on them."""
        qs = jnp.asarray(md.query_start)
        n_q = qs[1:] - qs[:-1]  # [S]: query tokens of each sequence
        t = q.shape[0]
        if self.verify_decode and t <= PER_TOKEN_MAX_TOKENS:
            short = (n_q >= 1) & (n_q <= SHORT_QUERY)  # [S]
            seq = jnp.asarray(md.token_seq)  # [T]
            take = short[seq] & (jnp.arange(t) < md.num_tokens)  # [T]
            table = jnp.asarray(md.page_table)[seq]  # [T, P]: each token's sequence's pages
            o_short = decode_attention(q, k_cache, v_cache, table,
                                       jnp.where(take, jnp.asarray(md.positions) + 1, 0),
                                       scale=scale, interpret=self.interpret,
                                       impl=self.decode_impl, sizes=self.decode_sizes)
            o = ragged_prefill.ragged_paged_attention(q, k_cache, v_cache, md, scale=scale,
                                                      interpret=self.interpret, skip=short,
                                                      sizes=self.prefill_sizes)
            return jnp.where(take[:, None, None], o_short, o)
        one = n_q == 1  # [S]: sequences with one query token
        last = jnp.clip(qs[1:] - 1, 0, q.shape[0] - 1)  # [S]: that token
        o_one = decode_attention(q[last], k_cache, v_cache, md.page_table,
                                 jnp.where(one, md.seq_lens, 0), scale=scale,
                                 interpret=self.interpret, impl=self.decode_impl,
                                 sizes=self.decode_sizes)
        o = ragged_prefill.ragged_paged_attention(q, k_cache, v_cache, md, scale=scale,
                                                  interpret=self.interpret, skip=one,
                                                  sizes=self.prefill_sizes)
        seq = jnp.asarray(md.token_seq)
        take = one[seq] & (jnp.arange(q.shape[0]) < md.num_tokens)  # [T]
        return jnp.where(take[:, None, None], o_one[seq], o)
