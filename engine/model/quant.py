"""One quantized-weight format for every backend, and the plain-JAX reference for each kind.

A `QuantizedWeight` stands in for a model weight of logical shape `in_shape + out_shape`
(what the model's einsum reads, e.g. w_gate [E] + [F], wo [Hq, D] + [E]). Its data is
stored by output channel, the layout PyTorch and GGUF use: row n holds the K = prod(in_shape)
weights of output n = flat index into out_shape.

    format  data                                   scales
    f32     float32 [N, K]                         [0]
    bf16    bfloat16 [N, K]                        [0]
    int8    int8 [N, K]                            float32 [N] (per output channel)
    q8_0    uint8 [N, K/32 * 34]  (GGUF blocks)    [0]
    q4_0    uint8 [N, K/32 * 18]  (GGUF blocks)    [0]
    q4_1    uint8 [N, K/32 * 20]  (GGUF blocks)    [0]
    q4_k    uint8 [N, K/256 * 144] (GGUF K-quant)  [0]
    q6_k    uint8 [N, K/256 * 210] (GGUF K-quant)  [0]
    fp8     float8_e4m3fn [N, K]                   float32 [N] (per output channel)
            (float8_e4m3fnuz on MI300: below)      or [N, K/G] (per group of G along K)
    int4    uint8 [N, K/2] (two 4-bit codes/byte)  float32 [N, K/G] (per group of G along K)

int4 (group-wise, asymmetric; what AWQ and GPTQ checkpoints hold): byte j of a row holds
codes 2j (low nibble) and 2j + 1 (high nibble), q in [0, 15]; `zeros` float32 [N, K/G] holds
each group's zero point in code units, and w = (q - zero) * scale. G = K / scales.shape[-1].
fp8 stores the weight divided by its channel's scale (w = data * scale), or by its group's
scale when the scales are [N, K/G] (scales.ndim == data.ndim: the 128 x 128 block scales of
HF `fp8` checkpoints, each block row's scales repeated for its rows); how activations are
handled (weight-only, or per-token e4m3 activations: W8A8) is the backend's choice, and its
reference says which. Every fp8 weight is made or loaded as OCP float8_e4m3fn; a backend
whose hardware has the other e4m3, float8_e4m3fnuz (AMD MI300: no negative zero, no
infinity, exponent bias 8, largest 240), converts it once at load (`fp8_to_fnuz`: the same
bytes, each worth half, so the scales double; exact). The kernels read which one a weight
holds from its data's dtype, and quantize activations to the same type (`fp8_rows`).

GGUF blocks of 32 weights along K, little-endian: q8_0 = f16 d, 32 x int8 q (w = d*q);
q4_0 = f16 d, 16 bytes of nibbles (w = d*(q - 8)); q4_1 = f16 d, f16 m, 16 bytes (w = d*q + m);
byte j of the nibbles holds element j (low nibble) and element j + 16 (high nibble).
K-quants, super-blocks of 256: q4_k = f16 d, f16 dmin, 12 bytes of 6-bit scales and mins
(8 each), 128 bytes of nibbles (sub-block s of 32: bytes 32*(s//2) onward, low nibbles for
even s; w = d*sc[s]*q - dmin*mn[s]); q6_k = 128 bytes of low nibbles, 64 bytes of 2-bit
highs, 16 int8 scales (one per 16 weights), f16 d (w = d*sc*(q - 32)).

Integer activations (`quantize_activations`): the CPU kernel can quantize x per block of 32
to int8 (as llama.cpp does) and dot integers; `reference_linear(x, w, int_act=True)`
is that arithmetic in plain JAX, up to float rounding.

q4_0x, q4_1x, q8_0x, int8x: q4_0, q4_1, q8_0 and int8 rearranged by the CPU backend at load
for its VNNI kernel (engine.model.packed has the layout; data [(L,) ceil(N/16), bytes], int8x
keeps its scales [(L,) N]); `dequantize` and `reference_linear` read them too.

Stacked layers (lax.scan) add a leading layer axis to data and scales. The model calls
`linear(x, w, eq)` for every projection; the backend's `linear` runs quantized weights (its
kernel, or `reference_linear` here, the oracle).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from engine.attention import FP8_TYPES
from engine.model import packed

FORMATS = {"f32": 0, "bf16": 1, "int8": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5, "q4_k": 6,
           "q6_k": 7, "q4_0x": 8, "q4_1x": 9, "q8_0x": 10, "int8x": 11}
"""Format name -> the number the CPU kernel's `fmt` attribute uses (the x formats: packed at
load for its VNNI kernel, engine.model.packed)."""
BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
SUPER = 256
SUPER_BYTES = {"q4_k": 144, "q6_k": 210}
"""GGUF K-quants: bytes of one super-block of SUPER weights."""


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    data: jax.Array
    """[(L,) N, K] or [(L,) N, K/32 * block bytes] by format (module docstring)."""
    scales: jax.Array
    """float32 [(L,) N] for int8 and fp8, [(L,) N, K/G] for int4 and grouped fp8, [(L,) 0]
    otherwise."""
    fmt: str
    in_shape: tuple[int, ...]
    """The logical weight's contracted dims (product K)."""
    out_shape: tuple[int, ...]
    """The logical weight's output dims (product N)."""
    zeros: jax.Array | None = None
    """int4 only: float32 [(L,) N, K/G] zero points (code units); None for other formats."""

    @property
    def k(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)


    @property
    def grouped(self) -> bool:
        """Scales per group along K ([(L,) N, K/G]): int4 always, fp8 from block scales."""
        return self.fmt in ("int4", "fp8") and self.scales.ndim == self.data.ndim

    @property
    def group_size(self) -> int:
        """Weights per scale along K (G): K / scales' last dim when grouped, else K."""
        return self.k // self.scales.shape[-1] if self.grouped else self.k


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["data", "scales", "zeros"],
                                 meta_fields=["fmt", "in_shape", "out_shape"])


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one output channel's K weights."""
    if fmt in BLOCK_BYTES:
        return k // BLOCK * BLOCK_BYTES[fmt]
    if fmt in SUPER_BYTES:
        return k // SUPER * SUPER_BYTES[fmt]
    if fmt == "int4":
        return k // 2
    return k * {"f32": 4, "bf16": 2, "int8": 1, "fp8": 1}[fmt]


def _f16(blocks: jax.Array, at: int) -> jax.Array:
    """The little-endian float16 at byte `at` of each block [..., B, bytes] -> f32 [..., B, 1]."""
    h = jax.lax.bitcast_convert_type(blocks[..., at:at + 2], jnp.float16)
    return h.astype(jnp.float32)[..., None]


def dequantize_rows(data: jax.Array, scales: jax.Array, fmt: str, k: int,
                    zeros: jax.Array | None = None) -> jax.Array:
    """float32 [..., K] from stored rows [..., row bytes] (any leading dims)."""
    if fmt in ("f32", "bf16"):
        return data.astype(jnp.float32)
    if fmt == "fp8" and scales.ndim == data.ndim:  # grouped: scales [..., K/G]
        groups = scales.shape[-1]
        w = data.astype(jnp.float32).reshape(*data.shape[:-1], groups, k // groups)
        return (w * scales[..., None]).reshape(*data.shape[:-1], k)
    if fmt in ("int8", "fp8"):
        return data.astype(jnp.float32) * scales[..., None]
    if fmt == "int4":
        if zeros is None:
            raise ValueError("int4 rows need their zero points")
        q = jnp.stack([data & 0xF, data >> 4], axis=-1).reshape(*data.shape[:-1], k)  # [..., K]
        groups = scales.shape[-1]
        q = q.reshape(*data.shape[:-1], groups, k // groups).astype(jnp.float32)
        w = (q - zeros[..., None]) * scales[..., None]  # [..., K/G, G]
        return w.reshape(*data.shape[:-1], k)
    if fmt in SUPER_BYTES:
        return _dequantize_k(data, fmt, k)
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown quantized format {fmt!r}; known: {', '.join(FORMATS)}")
    blocks = data.reshape(*data.shape[:-1], k // BLOCK, BLOCK_BYTES[fmt])  # [..., B, bytes]
    d = _f16(blocks, 0)
    if fmt == "q8_0":
        q = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
        w = d * q
    else:
        head = 2 if fmt == "q4_0" else 4
        nib = blocks[..., head:]  # [..., B, 16]
        q = jnp.concatenate([nib & 0xF, nib >> 4], axis=-1).astype(jnp.float32)  # [..., B, 32]
        w = d * (q - 8.0) if fmt == "q4_0" else d * q + _f16(blocks, 2)
    return w.reshape(*data.shape[:-1], k)


def _dequantize_k(data: jax.Array, fmt: str, k: int) -> jax.Array:
    """float32 [..., K] from K-quant rows [..., K/256 * bytes]."""
    lead = data.shape[:-1]
    sb = data.reshape(*lead, k // SUPER, SUPER_BYTES[fmt]).astype(jnp.int32)  # [..., S, bytes]
    if fmt == "q4_k":
        d, dmin = _f16(sb.astype(jnp.uint8), 0), _f16(sb.astype(jnp.uint8), 2)  # [..., S, 1]
        lo, hi, mix = sb[..., 4:8], sb[..., 8:12], sb[..., 12:16]  # 6-bit scales and mins
        sc = jnp.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=-1)  # [..., S, 8]
        mn = jnp.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
        qs = sb[..., 16:].reshape(*lead, k // SUPER, 4, 1, 32)  # 4 spans of 32 bytes
        q = (qs >> jnp.array([0, 4]).reshape(2, 1)) & 15  # [..., S, 4, 2, 32]: s = 2*span + nibble
        q = q.reshape(*lead, k // SUPER, 8, 32).astype(jnp.float32)
        w = (d * sc.astype(jnp.float32))[..., None] * q - (dmin * mn.astype(jnp.float32))[..., None]
    else:  # q6_k
        ql = sb[..., :128].reshape(*lead, k // SUPER, 2, 1, 64)  # halves of 128 weights
        qh = sb[..., 128:192].reshape(*lead, k // SUPER, 2, 1, 32)
        lo = ((ql >> jnp.array([0, 4]).reshape(2, 1)) & 15).reshape(*lead, k // SUPER, 2, 4, 32)
        hi = (qh >> jnp.array([0, 2, 4, 6]).reshape(4, 1)) & 3  # [..., S, 2, 4, 32]
        q = ((lo | (hi << 4)) - 32).reshape(*lead, k // SUPER, 16, 16).astype(jnp.float32)
        sc = jax.lax.bitcast_convert_type(sb[..., 192:208].astype(jnp.uint8), jnp.int8)
        d = _f16(sb.astype(jnp.uint8), 208)  # [..., S, 1]
        w = (d * sc.astype(jnp.float32))[..., None] * q  # [..., S, 16, 16]
    return w.reshape(*lead, k)


def quantize_activations(x: jax.Array) -> jax.Array:
    """x [T, K] (K a multiple of 32) as the CPU kernel's integer path sees it, float32: per
    block of 32, d = max|x| * (1/127), q = round-half-even(x * (1/d)), x' = d * q."""
    t, k = x.shape
    xb = x.astype(jnp.float32).reshape(t, k // BLOCK, BLOCK)  # [T, B, 32]
    d = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) * np.float32(1 / 127)
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    q = jnp.clip(jnp.round(xb * inv), -127, 127)
    return (q * d).reshape(t, k)


def int_activations_ok(w: QuantizedWeight) -> bool:
    """Whether the CPU kernel can dot w with integer activations (int8 or a GGUF format, K a
    multiple of 32)."""
    return w.fmt in FORMATS and w.fmt not in ("f32", "bf16") and w.k % BLOCK == 0


def weight_rows(w: QuantizedWeight) -> jax.Array:
    """The weight by output channel, float32 [(L,) N, K], any format (packed ones too)."""
    if w.fmt in packed.UNPACKED:
        return packed.dequantize_rows(w.data, w.scales, w.fmt, w.n, w.k)
    return dequantize_rows(w.data, w.scales, w.fmt, w.k, w.zeros)


def dequantize(w: QuantizedWeight) -> jax.Array:
    """The logical weight, float32 [(L,) *in_shape, *out_shape]."""
    nk = weight_rows(w)  # [(L,) N, K]
    lead = nk.shape[:-2]
    return jnp.swapaxes(nk, -1, -2).reshape(*lead, *w.in_shape, *w.out_shape)


def reference_linear(x: jax.Array, w: QuantizedWeight, int_act: bool = False) -> jax.Array:
    """x [T, *in_shape] -> [T, *out_shape] in x's dtype: dequantize, then one float32 dot
    (the oracle every kernel is tested against). int_act: x quantized as the kernel's
    integer path does first (quantize_activations)."""
    t = x.shape[0]
    nk = weight_rows(w)  # [N, K]
    x2 = x.reshape(t, w.k).astype(jnp.float32)  # [T, K]
    if int_act:
        x2 = quantize_activations(x2)
    y = jnp.dot(x2, nk.T,
                precision=jax.lax.Precision.HIGHEST)  # [T, N]
    return y.reshape(t, *w.out_shape).astype(x.dtype)


def fp8_rows(x: jax.Array, dtype: jnp.dtype = jnp.float8_e4m3fn
             ) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row (per-token) e4m3 quantization of activations x [M, K]: (dtype [M, K],
    float32 scales [M]), x ~= q * scale, scale = max|x_row| / dtype's largest value (448 for
    float8_e4m3fn, 240 for float8_e4m3fnuz; 1 for a zero row)."""
    dtype = jnp.dtype(dtype)
    if dtype not in FP8_TYPES:
        raise ValueError(f"fp8 activations are float8_e4m3fn or float8_e4m3fnuz, got {dtype}")
    top = float(jnp.finfo(dtype).max)
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / top  # [M]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(xf / scale[:, None], -top, top).astype(dtype)
    return q, scale


def fp8_to_fnuz(w: QuantizedWeight) -> QuantizedWeight:
    """An fp8 weight in float8_e4m3fnuz, worth exactly what it was in float8_e4m3fn.

    Both types have 1 sign, 4 exponent and 3 mantissa bits; fnuz's exponent bias is 8, one
    more than fn's 7, so a byte's fnuz value is half its fn value, subnormals included
    (fn: 2^(e-7) * 1.m and 2^-6 * 0.m; fnuz: 2^(e-8) * 1.m and 2^-7 * 0.m). The bytes stay
    and the scales double (exact in float32). Where the two differ: 0x80 is -0 in fn and
    NaN in fnuz, so it becomes 0x00 (+0, the same value); 0x7F and 0xFF are NaN in fn and
    +-240 in fnuz, so they become 0x80 (fnuz's NaN). fn's largest, 448 = 0x7E, is 224 in
    fnuz: a converted weight never reaches fnuz's 240. A weight already in fnuz is returned
    as it is."""
    if w.fmt != "fp8":
        raise ValueError(f"fp8_to_fnuz takes fp8 weights, got {w.fmt}")
    if jnp.dtype(w.data.dtype) == jnp.float8_e4m3fnuz:
        return w
    if jnp.dtype(w.data.dtype) != jnp.float8_e4m3fn:
        raise ValueError(f"fp8 weight data is float8_e4m3fn or float8_e4m3fnuz, got "
                         f"{w.data.dtype}")
    return dataclasses.replace(w, data=_fn_to_fnuz_bytes(w.data), scales=w.scales * 2)


@jax.jit
def _fn_to_fnuz_bytes(data: jax.Array) -> jax.Array:
    """fp8_to_fnuz's bytes, in one fused pass: a 4096 x 14336 weight in 0.021 s of one CPU
    core, 0.17 s as three eager ops (process time, best of 5, 2026-12-04)."""
    bits = jax.lax.bitcast_convert_type(data, jnp.uint8)
    bits = jnp.where(bits == 0x80, jnp.uint8(0), bits)
    bits = jnp.where((bits & 0x7F) == 0x7F, jnp.uint8(0x80), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fnuz)


def w8a8_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """fp8 weights with activations quantized per token (W8A8; the GPU's fp8 path): x
    [T, *in_shape] -> [T, *out_shape] in x's dtype; the oracle of the GPU's W8A8 kernels.
    Activations take the weight's e4m3 type (fnuz weights: fnuz activations, max 240)."""
    if w.fmt != "fp8":
        raise ValueError(f"W8A8 takes fp8 weights, got {w.fmt}")
    t = x.shape[0]
    xq, sx = fp8_rows(x.reshape(t, w.k), w.data.dtype)  # activations in the weight's e4m3
    nk = dequantize_rows(w.data, w.scales, w.fmt, w.k)  # [N, K]: per channel or grouped
    y = jnp.dot(xq.astype(jnp.float32) * sx[:, None], nk.T,
                precision=jax.lax.Precision.HIGHEST)  # [T, N]
    return y.reshape(t, *w.out_shape).astype(x.dtype)


def embed_rows(embed: jax.Array | QuantizedWeight, tokens: jax.Array, dtype: jnp.dtype
               ) -> jax.Array:
    """Embedding rows [T, E] of `tokens` [T]. A quantized embedding [V, E] is stored as the
    tied head's weight (in_shape (E,), out_shape (V,)): its rows are the token vectors."""
    if not isinstance(embed, QuantizedWeight):
        return embed[tokens]
    if embed.fmt in packed.UNPACKED:
        return packed.embed_rows(embed.data, embed.scales, embed.fmt, embed.k, tokens).astype(dtype)
    per_row = embed.scales.ndim > 0 and embed.scales.shape[0] == embed.n
    rows = dequantize_rows(embed.data[tokens], embed.scales[tokens] if per_row else
                           embed.scales, embed.fmt, embed.k,
                           None if embed.zeros is None else embed.zeros[tokens])
    return rows.astype(dtype)


INT4_GROUP = 128
"""int4's default group size along K (AWQ's and GPTQ's usual one); smaller K takes K."""


def int4_group(k: int, group: int = INT4_GROUP) -> int:
    """The group size int4 takes at load for a K that `group` may not divide: `group`, or
    the largest half, quarter, ... of it that divides K (SmolLM2's K=576: 64)."""
    g = min(group, k)
    while k % g and g % 4 == 0:
        g //= 2
    return g
FP8_MAX = 448.0
"""The largest finite float8_e4m3fn (float8_e4m3fnuz's is 240: jnp.finfo)."""


def pack(w: jax.Array, n_in: int, fmt: str, group: int = INT4_GROUP) -> QuantizedWeight:
    """A float weight [(L,) *in_shape, *out_shape] (its first n_in dims after L contracted)
    as f32, bf16, int8 (weight-only, symmetric, per output channel: scale = max|w| / 127),
    fp8 (per output channel: scale = max|w| / 448) or int4 (asymmetric, per `group` along K:
    scale = (max - min) / 15, zero = round(-min / scale))."""
    return _pack(w, n_in, fmt, stacked=False, group=group)


def _pack(w: jax.Array, n_in: int, fmt: str, stacked: bool, group: int = INT4_GROUP
          ) -> QuantizedWeight:
    lead = w.shape[:1] if stacked else ()
    dims = w.shape[len(lead):]
    in_shape, out_shape = tuple(dims[:n_in]), tuple(dims[n_in:])
    k, n = math.prod(in_shape), math.prod(out_shape)
    nk = jnp.swapaxes(w.reshape(*lead, k, n), -1, -2).astype(jnp.float32)  # [(L,) N, K]
    empty = jnp.zeros((*lead, 0), jnp.float32)
    if fmt == "f32":
        return QuantizedWeight(nk, empty, fmt, in_shape, out_shape)
    if fmt == "bf16":
        return QuantizedWeight(nk.astype(jnp.bfloat16), empty, fmt, in_shape, out_shape)
    if fmt == "fp8":
        scale = jnp.max(jnp.abs(nk), axis=-1) / FP8_MAX  # [(L,) N]
        scale = jnp.where(scale > 0, scale, 1.0)
        q = (nk / scale[..., None]).astype(jnp.float8_e4m3fn)
        return QuantizedWeight(q, scale, fmt, in_shape, out_shape)
    if fmt == "int4":
        return _pack_int4(nk, min(group, k), in_shape, out_shape)
    if fmt != "int8":
        raise ValueError(f"cannot quantize to {fmt!r} at load; use f32, bf16, int8, fp8 or "
                         f"int4")
    scale = jnp.max(jnp.abs(nk), axis=-1) / 127.0  # [(L,) N]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(nk / scale[..., None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q, scale, fmt, in_shape, out_shape)


def _pack_int4(nk: jax.Array, group: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> QuantizedWeight:
    """nk float32 [(L,) N, K] -> int4 codes [(L,) N, K/2], scales and zeros [(L,) N, K/G]."""
    *lead, n, k = nk.shape
    if k % group or group % 2:
        raise ValueError(f"int4 needs K={k} divisible by an even group size, got {group}")
    g = nk.reshape(*lead, n, k // group, group)  # [(L,) N, K/G, G]
    lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)
    scale = (hi - lo) / 15.0
    scale = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(g / scale[..., None]) + zero[..., None], 0, 15).astype(jnp.uint8)
    q = q.reshape(*lead, n, k // 2, 2)
    data = q[..., 0] | (q[..., 1] << 4)  # [(L,) N, K/2]
    return QuantizedWeight(data, scale, "int4", in_shape, out_shape, zero)


def pack_stacked(w: jax.Array, n_in: int, fmt: str, group: int = INT4_GROUP
                 ) -> QuantizedWeight:
    """`pack` for weights stacked on a leading layer axis [L, ...] (lax.scan)."""
    return _pack(w, n_in, fmt, stacked=True, group=group)


def from_gguf_rows(raw: np.ndarray, fmt: str, in_shape: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> QuantizedWeight:
    """GGUF blocks kept as they are: raw uint8 [N, row bytes] of one tensor."""
    k, n = math.prod(in_shape), math.prod(out_shape)
    unit = SUPER if fmt in SUPER_BYTES else BLOCK
    if fmt not in {**BLOCK_BYTES, **SUPER_BYTES} or k % unit or raw.shape != (n, row_bytes(fmt, k)):
        raise ValueError(f"{fmt} rows {raw.shape} do not fit a weight of K={k}, N={n}")
    data = jnp.asarray(np.ascontiguousarray(raw, dtype=np.uint8))
    return QuantizedWeight(data, jnp.zeros((0,), jnp.float32), fmt, in_shape, out_shape)


def pack_tiles(w: QuantizedWeight) -> QuantizedWeight:
    """w in its format packed for the CPU's VNNI kernel (engine.model.packed), made on the
    host; w as it is where its format has no packed form or K is not a multiple of 32."""
    if w.fmt not in packed.PACKED or w.k % BLOCK:
        return w
    data = packed.pack(np.asarray(w.data), w.fmt, w.n, w.k)
    return QuantizedWeight(jnp.asarray(data), w.scales, packed.PACKED[w.fmt], w.in_shape,
                           w.out_shape)
