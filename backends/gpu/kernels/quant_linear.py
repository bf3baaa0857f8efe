"""Quantized linear layers on the GPU: FP8 W8A8 GEMMs and fused dequantize-GEMMs for int8 and
int4 weight-only, as Pallas kernels lowered through Triton (shared by CUDA and ROCm).

Weights are engine.model.quant's QuantizedWeight, stored by output channel [N, K]:

    fp8   float8_e4m3fn [N, K], scales f32 [N]: W8A8. Activations are quantized per token
          to e4m3 (quant.fp8_rows: scale = max|x_row| / 448) in XLA, the dot runs on FP8
          tensor cores with float32 accumulation, and both scales multiply the accumulator.
          Two implementations: `w8a8_pallas` (ours) and `w8a8_xla` (a plain dot of the two
          f8 operands, both contracted on their minor axis K, the operand layout XLA's
          GemmRewriter turns into cuBLASLt's FP8 matmul without a transpose). Grouped
          scales [N, K/G] (block-scaled checkpoints) take ours, one scale per K step.
          Up to quant_tuning.FP8_WEIGHT_ONLY_MAX_M rows ('auto'), fp8 weights run
          weight-only instead (`woq_pallas`, as int8: bf16 activations, the e4m3 tile
          converted to bf16 in registers, exact; no activation quantization kernel).
          On MI300 (ROCm, fp8_type e4m3fnuz) the weight holds float8_e4m3fnuz (converted at
          load: quant.fp8_to_fnuz) and activations are quantized to it (max 240): every
          path takes the e4m3 type from the weight's dtype.
    int8  int8 [N, K], scales f32 [N]: weight-only. Up to WOQ_MAX_M rows (decode steps):
          `woq_pallas` reads the int8 tile, converts it in registers (exact; by the
          exponent trick of _weight_values, no int->float convert) and multiplies the f32
          accumulator by the channel scale at the end. Above (prompt chunks): dequantize
          to bf16, then XLA's dot (compute-bound there).
    int4  uint8 [N, K/2] (codes 2j low nibble, 2j+1 high), scales and zeros f32 [N, K/G]:
          weight-only, group-wise. `woq_pallas` walks K one group at a time: the low and
          high nibbles meet x's even and odd columns (x viewed as [M, K/2, 2] pairs), and per group
          acc += s * (x . q - z * sum(x)), exact for any zero point. Codes become bf16
          without an int->float convert: OR-ing the nibble into the mantissa of 128.0
          (0x4300) gives exactly 128 + q, and the 128 is folded into the zero term:
          x . (128 + q) - (z + 128) * sum(x).

Two ways to run a tile's dot: Triton's dot on tensor cores (tiles of at least 16 rows, x's
rows padded), or `gemv` (one program per row of x: the weight tile times the row, summed
along K on the CUDA cores; no padded MMA and no staging of the converted tile in shared
memory, what a batch-1 decode GEMM wants). Tile sizes, split and mode come from
quant_tuning.TUNED (measured per shape) or prior_sizes.

References (the tests compare each kernel with them): quant.reference_linear for the
weight-only formats, quant.w8a8_reference for fp8.

Under a mesh (tensor parallelism) every format takes plain XLA (w8a8_xla, or the weight
dequantized then XLA's dot), which the SPMD partitioner splits; the kernels would need a
shard_map of their own.

Work split: a grid of (M blocks, N blocks, K splits). Decode-sized M has few output tiles,
so K is split until about TARGET_PROGRAMS programs run; the splits' float32 partial sums
are added in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from backends.gpu.kernels import fp8 as fp8_kernel
from backends.gpu.kernels import quant_tuning
from engine.model.quant import FP8_TYPES, QuantizedWeight, dequantize_rows, fp8_rows


@dataclasses.dataclass(frozen=True)
class GemmSizes:
    """Tiles and launch parameters of one kernel call (powers of two; Triton's dot needs 16
    and up in every dimension)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 264
    """K is split until M blocks x N blocks x splits reaches this (two per H200 SM)."""
    max_splits: int = 16
    splits: int = 0
    """K splits; 0: from target_programs (num_splits)."""
    gemv: bool = False
    """block_m 1 and the dot as multiply-and-sum on the CUDA cores (weight-only kernels)."""


# Tuning as data. First figures (2026-12-03) are the usual Triton choices for Hopper,
# unmeasured: scripts/gpu/quant.sh's `gemm` stage times them against bf16 and XLA's FP8 dot.
SMALL_M = 64
"""Up to this many rows, 16-to-64-row tiles with K split (decode-sized steps); fp8_gemm
'auto' takes our kernel here and XLA's FP8 dot above."""
WOQ_MAX_M = {"int8": 256, "int4": 32, "fp8": 256}
"""Weight format -> the most rows with which it takes the fused kernel (64-row tiles past
SMALL_M, each dequantizing its weight tiles again; fp8 only under fp8_gemm 'weight_only');
above, the weight dequantized to bf16 then XLA's dot. Chosen from whole decode steps (H200,
2026-12-04, 8B shape, ctx 1024, `scripts/gpu/decode_fusions.py` with PROBE_QUANT and
PROBE_WOQ_MAX_M; ms a step, fused vs dequantized): int4 9.53 vs 23.37 at 32 rows, 26.72 vs
24.77 at 64, 94.7 vs 33.27 at 256; int8 8.27 vs 16.58 at 64, 26.48 vs 25.11 at 256 (left at
256: within 6%, 128 rows not timed). Both paths lose to bf16 past 16 rows (bf16: 6.86 ms at
64, 15.31 at 256): the fused kernel is bound by its unpacking, the dequantized dot writes
and reads back the whole weight in bf16 every step."""
SMALL = GemmSizes(block_m=16, block_n=64, block_k=128)
"""M <= SMALL_M; block_m grows to M's next power of two."""
LARGE = GemmSizes(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
"""FP8 W8A8 above SMALL_M rows."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


SCHEMES = ("int4", "int8", "fp8w", "w8a8")
"""quant_tuning's scheme names: weight-only int4, int8 and fp8 (`woq_pallas`), fp8 W8A8."""


def prior_sizes(scheme: str, m: int) -> GemmSizes:
    """The untuned choice (2026-12-03): weight-only at one row as a GEMV with more, lighter
    programs; otherwise 16-to-64-row tiles (SMALL) up to SMALL_M rows and LARGE above."""
    # GEMV tiles of 8K-16K weights a step over 8 warps: 32-64 converted values a thread.
    if scheme == "int4" and m == 1:  # a step is one group (64 bytes a row at G = 128)
        return GemmSizes(1, 128, 64, num_warps=8, gemv=True)
    if scheme != "w8a8" and m == 1:
        return GemmSizes(1, 64, 256, num_warps=8, gemv=True, target_programs=528)
    if m <= SMALL_M or scheme != "w8a8":
        return dataclasses.replace(SMALL, block_m=max(16, _pow2(min(m, SMALL_M))))
    return LARGE


def sizes_for(scheme: str, m: int, k: int, n: int) -> GemmSizes:
    """The tuning for a GEMM of m rows, K = k, N = n: quant_tuning.TUNED's entry for the
    row bucket and shape, else the prior."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown GEMM scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    b = quant_tuning.bucket(m)
    entry = quant_tuning.TUNED.get((scheme, b, k, n)) if b else None
    if entry is None:
        return prior_sizes(scheme, m)
    bm, bn, bk, splits, warps, stages, gemv = entry
    if gemv and scheme == "w8a8":
        raise ValueError(f"quant_tuning.TUNED[{(scheme, b, k, n)}]: W8A8 has no GEMV mode")
    bm = 1 if gemv else max(16, min(bm, _pow2(m)))
    return GemmSizes(bm, bn, bk, warps, stages, splits=splits, gemv=bool(gemv))


def num_splits(programs: int, k_tiles: int, sizes: GemmSizes) -> int:
    """The fewest power-of-two K splits (each at least one tile) that bring `programs`
    output tiles up to sizes.target_programs."""
    if sizes.splits:
        return max(1, min(sizes.splits, k_tiles))
    s = 1
    while (programs * s < sizes.target_programs and s * 2 <= sizes.max_splits
           and s * 2 <= k_tiles):
        s *= 2
    return s


def _tile_mask(rows: jax.Array, nrows: int, cols: jax.Array, ncols: int,
               check_rows: bool, check_cols: bool) -> jax.Array | None:
    """[R, C] in-bounds mask, or None when both extents are known to divide."""
    mask = None
    if check_rows:
        mask = jnp.broadcast_to((rows < nrows)[:, None], (rows.shape[0], cols.shape[0]))
    if check_cols:
        cm = jnp.broadcast_to((cols < ncols)[None, :], (rows.shape[0], cols.shape[0]))
        mask = cm if mask is None else mask & cm
    return mask


def _load(ref, mask):
    return plgpu.load(ref, mask=mask, other=0) if mask is not None else plgpu.load(ref)


def _load_fp8(ref, mask, fp8):
    """An e4m3 tile (`fp8`: float8_e4m3fn or float8_e4m3fnuz) from a uint8 ref holding its
    bits: Pallas' Triton lowering cannot make the masked load's fill value (an int splat) in
    float8, so the load is of bytes (0 fills: +0.0 in both types) and the bits are
    reinterpreted."""
    return lax.bitcast_convert_type(_load(ref, mask), fp8)


def _k_tiles(x_ref, w_ref, t, i, j, mnk: tuple[int, int, int], sizes: GemmSizes, load):
    """K step t's tiles of x [M, K] and w [N, K] for output block (i, j): x [BM, BK] and
    w [BN, BK], masked (by `load`) where they pass M, N or K."""
    (m, n, k), bm, bn, bk = mnk, sizes.block_m, sizes.block_n, sizes.block_k
    rows, cols, kk = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn), t * bk + jnp.arange(bk)
    x = load(x_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)],
             _tile_mask(rows, m, kk, k, m % bm != 0, k % bk != 0))
    w = load(w_ref.at[pl.ds(j * bn, bn), pl.ds(t * bk, bk)],
             _tile_mask(cols, n, kk, k, n % bn != 0, k % bk != 0))
    return x, w


def _k_range(split: jax.Array, per_split: int, k_tiles: int) -> tuple[jax.Array, jax.Array]:
    lo = split * per_split
    return lo, jnp.minimum(lo + per_split, k_tiles)


def _store(o_ref, i, j, bm, bn, m, n, out):
    rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
    mask = _tile_mask(rows, m, cols, n, m % bm != 0, n % bn != 0)
    ref = o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)]
    if mask is None:
        plgpu.store(ref, out.astype(o_ref.dtype))
    else:
        plgpu.store(ref, out.astype(o_ref.dtype), mask=mask)


def _w8a8_kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, m: int, n: int, k: int,
                 sizes: GemmSizes, per_split: int, grouped: bool, fp8: jnp.dtype):
    # x_ref [M, K] and w_ref [N, K]: `fp8` bits as uint8 (_load_fp8); sx_ref [M];
    # o_ref [M, N] (this split's);
    # sw_ref [N], or [N, K/G] when grouped (then block_k = G: one scale per step).
    bm, bn, bk = sizes.block_m, sizes.block_n, sizes.block_k
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
    col_ok = cols < n if n % bn else None

    def step(t, acc):
        x, w = _k_tiles(x_ref, w_ref, t, i, j, (m, n, k), sizes,
                        functools.partial(_load_fp8, fp8=fp8))
        part = plgpu.dot(x, w, trans_b=True)  # FP8 x FP8 -> f32 [BM, BN]
        if grouped:
            part = part * _load(sw_ref.at[pl.ds(j * bn, bn), t], col_ok)[None, :]
        return acc + part

    lo, hi = _k_range(split, per_split, _cdiv(k, bk))
    acc = lax.fori_loop(lo, hi, step, jnp.zeros((bm, bn), jnp.float32))
    acc = acc * _load(sx_ref.at[pl.ds(i * bm, bm)], rows < m if m % bm else None)[:, None]
    if not grouped:
        acc = acc * _load(sw_ref.at[pl.ds(j * bn, bn)], col_ok)[None, :]
    _store(o_ref, i, j, bm, bn, m, n, acc)


MAGIC_128 = 0x4300
"""bf16 bits of 128.0: its 7 mantissa bits count units, so OR-ing a code q < 16 into them
gives exactly 128 + q."""


def _int4_codes(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 [BN, B] -> (low, high nibbles) as bf16 [BN, B] holding 128 + code: integer
    AND/shift/OR and a bitcast, no int->float conversion."""
    u = q.astype(jnp.uint16)
    lo = lax.bitcast_convert_type((u & 0xF) | MAGIC_128, jnp.bfloat16)
    hi = lax.bitcast_convert_type((u >> 4) | MAGIC_128, jnp.bfloat16)
    return lo, hi


MAGIC_2_23 = 0x4B000000
"""f32 bits of 2^23: its 23 mantissa bits count units, so OR-ing u < 2^23 into them gives
exactly 2^23 + u."""


def _weight_values(w: jax.Array, fmt: str, gemv: bool,
                   fp8: jnp.dtype = jnp.float8_e4m3fn) -> jax.Array:
    """An int8 tile, or e4m3 bits (of type `fp8`) as uint8, as bf16 for the tensor cores or
    f32 for GEMV (exact either way). int8 without an int->float convert: its byte offset by
    128 (b ^ 0x80 = b + 128 in [0, 255]) OR-ed into the mantissa of 2^23 is 2^23 + 128 + b."""
    if fmt == "fp8":  # fnuz: decoded from its bits (Pallas cannot cast it: kernels/fp8.py)
        return fp8_kernel.upcast(lax.bitcast_convert_type(w, fp8),
                                 jnp.float32 if gemv else jnp.bfloat16)
    u = lax.bitcast_convert_type(w, jnp.uint8).astype(jnp.uint32)
    v = lax.bitcast_convert_type((u ^ 0x80) | MAGIC_2_23, jnp.float32) - float(2**23 + 128)
    return v if gemv else v.astype(jnp.bfloat16)


def _tile_dot(x: jax.Array, w: jax.Array, gemv: bool) -> jax.Array:
    """x [BM, BK] (gemv: one row [BK]) . w [BN, BK] over K -> [BM, BN] (gemv: [BN]), f32."""
    if gemv:
        return jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32)[None, :], axis=1)
    return plgpu.dot(x, w, trans_b=True)


def _woq_kernel(*refs, m: int, n: int, k: int, sizes: GemmSizes, per_split: int,
                fmt: str, fp8: jnp.dtype = jnp.float8_e4m3fn):
    # int8/fp8: x_ref [M, K] bf16, w_ref [N, K] int8 (fp8: `fp8` bits as uint8), s_ref [N].
    # int4: x_ref [M, K/2, 2] bf16 (column pairs), w_ref [N, K/2] uint8, s_ref, z_ref
    #       [N, K/G]; one step = one group (block_k = G/2 bytes).
    # o_ref [M, N] (this split's). gemv: block_m 1, program_id(0) is x's row.
    bm, bn, bk, gemv = sizes.block_m, sizes.block_n, sizes.block_k, sizes.gemv
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
    col_ok = cols < n if n % bn else None
    col_m = _tile_mask(cols, n, jnp.arange(bk), bk, n % bn != 0, False)
    # acc: [BN] (gemv) or [BM, BN]; per-row [BM] values broadcast along N by `by_row`.
    acc0 = jnp.zeros((bn,) if gemv else (bm, bn), jnp.float32)

    def by_row(v):
        return v if gemv else v[:, None]

    def by_col(v):
        return v if gemv else v[None, :]

    if fmt == "int4":
        x_ref, w_ref, s_ref, z_ref, o_ref = refs
        groups = s_ref.shape[1]
        row_m = _tile_mask(rows, m, jnp.arange(bk), bk, m % bm != 0, False)

        def x_half(g, parity):  # x's columns 2j + parity of group g: [BM, G/2] or [G/2]
            pairs, parity = pl.ds(g * bk, bk), jnp.int32(parity)  # an array: the interpreter's
            if gemv:
                return plgpu.load(x_ref.at[i, pairs, parity])
            return _load(x_ref.at[pl.ds(i * bm, bm), pairs, parity], row_m)

        def step(g, acc):
            xe, xo = x_half(g, 0), x_half(g, 1)
            q = _load(w_ref.at[pl.ds(j * bn, bn), pl.ds(g * bk, bk)], col_m)  # [BN, G/2]
            lo, hi = _int4_codes(q)  # 128 + codes 2j (x's even columns), 2j + 1 (odd)
            dot = _tile_dot(xe, lo, gemv) + _tile_dot(xo, hi, gemv)
            xsum = (xe.astype(jnp.float32).sum(axis=-1)
                    + xo.astype(jnp.float32).sum(axis=-1))  # [BM] or a scalar
            s = _load(s_ref.at[pl.ds(j * bn, bn), g], col_ok)  # [BN]
            z = _load(z_ref.at[pl.ds(j * bn, bn), g], col_ok)
            return acc + by_col(s) * (dot - by_row(xsum) * by_col(z + 128.0))

        lo, hi = _k_range(split, per_split, groups)
        acc = lax.fori_loop(lo, hi, step, acc0)
    else:
        x_ref, w_ref, s_ref, o_ref = refs

        def step(t, acc):
            if gemv:
                kk = t * bk + jnp.arange(bk)
                x = _load(x_ref.at[i, pl.ds(t * bk, bk)], kk < k if k % bk else None)
                w = _load(w_ref.at[pl.ds(j * bn, bn), pl.ds(t * bk, bk)],
                          _tile_mask(cols, n, kk, k, n % bn != 0, k % bk != 0))
            else:
                x, w = _k_tiles(x_ref, w_ref, t, i, j, (m, n, k), sizes, _load)
            return acc + _tile_dot(x, _weight_values(w, fmt, gemv, fp8), gemv)

        lo, hi = _k_range(split, per_split, _cdiv(k, bk))
        acc = lax.fori_loop(lo, hi, step, acc0)
        acc = acc * by_col(_load(s_ref.at[pl.ds(j * bn, bn)], col_ok))
    if gemv:
        ref = o_ref.at[i, pl.ds(j * bn, bn)]
        out = acc.astype(o_ref.dtype)
        if col_ok is None:
            plgpu.store(ref, out)
        else:
            plgpu.store(ref, out, mask=col_ok)
    else:
        _store(o_ref, i, j, bm, bn, m, n, acc)


def _launch(kernel, args: tuple, shape: tuple[int, int], k_tiles: int, out_dtype,
            sizes: GemmSizes, interpret: bool, name: str, **params) -> jax.Array:
    """The grid (M blocks, N blocks, K splits) over whole-array refs; splits' float32 partials
    [splits, M, N] summed here. shape: (M, N). -> [M, N] out_dtype."""
    m, n = shape
    grid_mn = (_cdiv(m, sizes.block_m), _cdiv(n, sizes.block_n))
    splits = num_splits(grid_mn[0] * grid_mn[1], k_tiles, sizes)
    per_split = _cdiv(k_tiles, splits)
    splits = _cdiv(k_tiles, per_split)  # no empty split
    part_dtype = out_dtype if splits == 1 else jnp.float32
    whole = [pl.BlockSpec(a.shape, functools.partial(lambda nd, i, j, s: (0,) * nd, a.ndim))
             for a in args]
    out = pl.pallas_call(
        functools.partial(kernel, per_split=per_split, sizes=sizes, **params),
        grid=(*grid_mn, splits),
        in_specs=whole,
        out_specs=pl.BlockSpec((None, m, n), lambda i, j, s: (s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), part_dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps,
                                             num_stages=sizes.num_stages),
        name=f"{name}_bm{sizes.block_m}_bn{sizes.block_n}_bk{sizes.block_k}_ks{splits}",
    )(*args)
    return out[0] if splits == 1 else out.sum(axis=0).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "sizes", "interpret"))
def w8a8_pallas(xq: jax.Array, sx: jax.Array, wq: jax.Array, sw: jax.Array, *, out_dtype,
                sizes: GemmSizes | None = None, interpret: bool = False) -> jax.Array:
    """xq f8 [M, K] with per-row scales sx [M], wq f8 [N, K] with per-channel scales sw [N]
    (or per group along K, [N, K/G], G a power of two >= 16) -> (xq * sx) @ (wq * sw).T
    [M, N] out_dtype; FP8 tensor cores, float32 accumulation. xq and wq are both
    float8_e4m3fn or both float8_e4m3fnuz (MI300's)."""
    (m, k), n = xq.shape, wq.shape[0]
    fp8 = _fp8_pair(xq, wq)
    sizes = sizes or sizes_for("w8a8", m, k, n)
    if sizes.gemv:
        raise ValueError("w8a8_pallas has no GEMV mode (its dot is FP8 tensor cores)")
    grouped = sw.ndim == 2
    if grouped:
        g = k // sw.shape[1]
        if not fp8_groups_fit(g) or g * sw.shape[1] != k:
            raise ValueError(f"w8a8_pallas: groups of {g} along K={k} are not a power of two "
                             f">= 16")
        sizes = dataclasses.replace(sizes, block_k=g)
    bits = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.uint8)  # free: a view
    return _launch(_w8a8_kernel, (bits(xq), sx.astype(jnp.float32), bits(wq),
                                  sw.astype(jnp.float32)),
                   (m, n), _cdiv(k, sizes.block_k), out_dtype, sizes, interpret, "w8a8",
                   m=m, n=n, k=k, grouped=grouped, fp8=fp8)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def w8a8_xla(xq: jax.Array, sx: jax.Array, wq: jax.Array, sw: jax.Array, *,
             out_dtype) -> jax.Array:
    """w8a8_pallas's contract through XLA: one dot of the f8 operands, both contracted on
    their minor axis (x [M, K], w [N, K]: cuBLASLt's FP8 layout, no transpose), float32
    out, the scales applied after (an elementwise fusion)."""
    _fp8_pair(xq, wq)
    acc = lax.dot_general(xq, wq, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)  # [M, N]
    return (acc * sx[:, None] * sw[None, :]).astype(out_dtype)


def _fp8_pair(xq: jax.Array, wq: jax.Array) -> jnp.dtype:
    """The e4m3 type of a W8A8 GEMM's operands; ValueError unless both have it (a dot of
    fn by fnuz would be off by a factor of two)."""
    if xq.dtype != wq.dtype or jnp.dtype(xq.dtype) not in FP8_TYPES:
        raise ValueError(f"W8A8 takes activations and weights of one e4m3 type "
                         f"(float8_e4m3fn or float8_e4m3fnuz), got {xq.dtype} and {wq.dtype}")
    return jnp.dtype(xq.dtype)


WOQ_FORMATS = {"int8": "int8", "int4": "int4", "fp8": "fp8w"}
"""Weight formats woq_pallas takes -> their quant_tuning scheme."""


@functools.partial(jax.jit, static_argnames=("sizes", "interpret"))
def woq_pallas(x: jax.Array, w: QuantizedWeight, *, sizes: GemmSizes | None = None,
               interpret: bool = False) -> jax.Array:
    """x [M, K] @ an int8, int4 or per-channel fp8 weight [N, K] -> [M, N] in x's dtype:
    the fused dequantize-GEMM. x is rounded to bf16 for the dot (the GPU's matmul input; the
    weight values, int4's 128 + q and e4m3 are exact in bf16), accumulation in float32."""
    m, k = x.shape
    n = w.n
    if w.fmt not in WOQ_FORMATS or (w.fmt == "int4" and not int4_kernel_fits(w.group_size)) \
            or (w.fmt == "fp8" and w.grouped):
        raise ValueError(f"woq_pallas takes int8, per-channel fp8, or int4 with a group of "
                         f"32..256, got {w.fmt} (group {w.group_size})")
    sizes = sizes or sizes_for(WOQ_FORMATS[w.fmt], m, k, n)
    xb = x.astype(jnp.bfloat16)
    if w.fmt != "int4":
        data = w.data if w.fmt == "int8" else lax.bitcast_convert_type(w.data, jnp.uint8)
        fp8 = jnp.dtype(w.data.dtype) if w.fmt == "fp8" else jnp.dtype(jnp.float8_e4m3fn)
        return _launch(_woq_kernel, (xb, data, w.scales), (m, n), _cdiv(k, sizes.block_k),
                       x.dtype, sizes, interpret, f"woq_{w.fmt}", m=m, n=n, k=k, fmt=w.fmt,
                       fp8=fp8)
    sizes = dataclasses.replace(sizes, block_k=w.group_size // 2)
    pairs = xb.reshape(m, k // 2, 2)  # [M, K/2, 2]: a view; the kernel loads [..., 0] / [..., 1]
    return _launch(_woq_kernel, (pairs, w.data, w.scales, w.zeros), (m, n), k // w.group_size,
                   x.dtype, sizes, interpret, "woq_int4", m=m, n=n, k=k, fmt="int4")


def fp8_groups_fit(group: int) -> bool:
    """Grouped fp8 scales: the kernel's step is one group, a power of two of 16 (Triton's
    smallest dot) to 512."""
    return 16 <= group <= 512 and group & (group - 1) == 0


def int4_kernel_fits(group: int) -> bool:
    """The kernel's step is one group: G/2 bytes, a power of two of 16 (Triton's smallest
    dot) to 128."""
    return 32 <= group <= 256 and group & (group - 1) == 0


def dequantized_dot(x: jax.Array, w: QuantizedWeight, dtype=jnp.bfloat16) -> jax.Array:
    """Large M: the weight dequantized to `dtype` [N, K], then XLA's dot -> [M, N] x.dtype."""
    wd = dequantize_rows(w.data, w.scales, w.fmt, w.k, w.zeros).astype(dtype)  # [N, K]
    y = lax.dot_general(x.astype(dtype), wd, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


FP8_GEMMS = ("auto", "xla", "pallas", "weight_only")


def quant_linear(x: jax.Array, w: QuantizedWeight, *, fp8_gemm: str = "auto",
                 interpret: bool = False, sharded: bool = False) -> jax.Array:
    """x [T, *in_shape] @ w -> [T, *out_shape] in x's dtype: the GPU path for each format.
    fp8_gemm: 'xla', 'pallas' (W8A8 through XLA's dot or ours), 'weight_only' (bf16
    activations, woq_pallas; per-channel scales), or 'auto' (weight-only up to
    quant_tuning.FP8_WEIGHT_ONLY_MAX_M rows, then ours up to SMALL_M, XLA's above; grouped
    fp8 scales, from block-scaled checkpoints, take our W8A8 kernel). int8, int4 (and fp8
    weight-only) take the fused kernel up to WOQ_MAX_M[format] rows. `sharded` (the weight is split
    over a mesh): plain XLA only, which XLA's SPMD partitioner splits (a pallas_call it
    cannot)."""
    t = x.shape[0]
    x2 = x.reshape(t, w.k)  # [M, K]
    kernels = not sharded
    fp8_woq = kernels and w.fmt == "fp8" and not w.grouped and (
        (fp8_gemm == "weight_only" and t <= WOQ_MAX_M["fp8"])
        or (fp8_gemm == "auto" and t <= quant_tuning.FP8_WEIGHT_ONLY_MAX_M))
    if fp8_woq:
        y = woq_pallas(x2, w, interpret=interpret)
    elif w.fmt == "fp8" and (not w.grouped or (kernels and fp8_groups_fit(w.group_size))):
        xq, sx = fp8_rows(x2, w.data.dtype)  # the weight's e4m3 (fnuz on MI300)
        use_pallas = kernels and (w.grouped or fp8_gemm == "pallas"
                                  or (fp8_gemm == "auto" and t <= SMALL_M))
        if use_pallas:
            y = w8a8_pallas(xq, sx, w.data, w.scales, out_dtype=x.dtype, interpret=interpret)
        else:
            y = w8a8_xla(xq, sx, w.data, w.scales, out_dtype=x.dtype)
    elif kernels and w.fmt in ("int8", "int4") and t <= WOQ_MAX_M[w.fmt] and (
            w.fmt == "int8" or int4_kernel_fits(w.group_size)):
        y = woq_pallas(x2, w, interpret=interpret)
    else:  # large M, other formats: XLA's dot on the weight dequantized to bf16 (f32 kept)
        y = dequantized_dot(x2, w, jnp.float32 if w.fmt == "f32" else jnp.bfloat16)
    return y.reshape(t, *w.out_shape)
