"""Weights packed for the CPU's VNNI kernel (backends/cpu/kernels/linear/packed.cc): q4_0x,
q4_1x, q8_0x and int8x are q4_0, q4_1, q8_0 and int8 (per channel) rearranged once at load.

data: uint8 [(L,) ceil(N/16), K/32 * block bytes]: tiles of 16 output columns (N padded with
zero columns), each a run of K/32 blocks; a block holds the tile's 32 weights per column as
unsigned bytes u, w = d * u + c:
    q4_0x  u = q (0..15), c = -8 d    4 chunks of 64 bytes, f16 d [16]               288 B
    q4_1x  u = q,         c = m       4 chunks, f16 d [16], f16 m [16]               320 B
    q8_0x  u = q + 128,   c = -128 d  8 chunks of 64 bytes, f16 d [16]               544 B
    int8x  u = q + 128,   c = -128 d  8 chunks; d = scales [N] (float32, kept apart) 512 B
A chunk is [16 columns][4 bytes]. 8-bit formats: chunk s holds elements 4s..4s+3 of each
column. 4-bit formats (still 4 bits a weight, as many bytes as the GGUF blocks): chunk j's low
nibbles hold elements 4j..4j+3, its high nibbles elements 16+4j..16+4j+3.

`pack` is numpy (once, at load, on the host); `dequantize_rows` is plain JAX (the oracle's
and the embedding gather's way to read them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TILE = 16
"""Output columns of a packed tile."""
BLOCK = 32
PACKED = {"q4_0": "q4_0x", "q4_1": "q4_1x", "q8_0": "q8_0x", "int8": "int8x"}
"""Format -> its packed format."""
UNPACKED = {v: k for k, v in PACKED.items()}
BLOCK_BYTES = {"q4_0x": 288, "q4_1x": 320, "q8_0x": 544, "int8x": 512}
"""Bytes of one tile's block of 32 weights (16 columns)."""
_GGUF_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def data_shape(fmt: str, n: int, k: int) -> tuple[int, int]:
    """A packed weight's data shape (without the layer axis)."""
    return (-(-n // TILE), k // BLOCK * BLOCK_BYTES[fmt])


def pack(data: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    """Rows by output channel [(L,) N, row bytes] (GGUF blocks; int8: int8 [(L,) N, K]) ->
    packed uint8 [(L,) ceil(N/16), K/32 * block bytes] of PACKED[fmt]."""
    if fmt not in PACKED or k % BLOCK:
        raise ValueError(f"cannot pack {fmt} with K={k}: packs {', '.join(PACKED)}, K % 32 == 0")
    lead, nb = data.shape[:-2], k // BLOCK
    t = -(-n // TILE)
    if fmt == "int8":
        u = (data.view(np.uint8) ^ 0x80).reshape(*lead, n, nb, BLOCK)  # q + 128
        scales = []
    else:
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(*lead, n, nb, _GGUF_BYTES[fmt])
        if fmt == "q8_0":
            u = blocks[..., 2:] ^ 0x80  # q + 128
            scales = [blocks[..., 0:2]]
        else:
            head = 2 if fmt == "q4_0" else 4
            nib = blocks[..., head:]
            u = np.concatenate([nib & 0xF, nib >> 4], axis=-1)  # [.., N, B, 32]
            scales = [blocks[..., 0:2]] + ([blocks[..., 2:4]] if fmt == "q4_1" else [])
    pad = [(0, 0)] * len(lead) + [(0, t * TILE - n), (0, 0), (0, 0)]
    u = np.pad(u, pad).reshape(*lead, t, TILE, nb, 8, 4)  # [.., T, c, B, s, i]
    u = np.moveaxis(u, -4, -2)  # [.., T, B, s, c, i]
    if fmt in ("q4_0", "q4_1"):
        u = u[..., :4, :, :] | (u[..., 4:, :, :] << 4)  # chunk j: steps j (low), j + 4 (high)
    parts = [u.reshape(*lead, t, nb, -1)]
    for sc in scales:  # f16 bytes [.., N, B, 2] -> [.., T, B, 16 * 2]
        sc = np.pad(sc, pad).reshape(*lead, t, TILE, nb, 2)
        parts.append(np.moveaxis(sc, -3, -2).reshape(*lead, t, nb, 2 * TILE))
    out = np.concatenate(parts, axis=-1)  # [.., T, B, block bytes]
    return np.ascontiguousarray(out.reshape(*lead, t, -1))


def _f16(b: jax.Array) -> jax.Array:
    """f16 bytes [..., 32] -> float32 [..., 16]."""
    h = jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], TILE, 2), jnp.float16)
    return h.astype(jnp.float32)


def dequantize_rows(data: jax.Array, scales: jax.Array, fmt: str, n: int, k: int) -> jax.Array:
    """float32 [(L,) N, K] from a packed weight (plain JAX)."""
    lead, nb = data.shape[:-2], k // BLOCK
    t = data.shape[-2]
    blocks = data.reshape(*lead, t, nb, BLOCK_BYTES[fmt])
    if fmt in ("q4_0x", "q4_1x"):
        nib = blocks[..., :256].reshape(*lead, t, nb, 4, TILE, 4)
        q = jnp.concatenate([nib & 0xF, nib >> 4], axis=-3)  # [.., T, B, s, c, i]
    else:
        q = blocks[..., :512].reshape(*lead, t, nb, 8, TILE, 4)
    q = jnp.moveaxis(q, -2, -4).astype(jnp.float32)  # [.., T, c, B, s, i]
    q = q.reshape(*lead, t, TILE, nb, BLOCK)  # [.., T, c, B, 32]
    if fmt == "int8x":
        w = (q - 128.0).reshape(*lead, t * TILE, k)[..., :n, :]
        return w * scales[..., None]
    qb = 256 if fmt == "q4_1x" or fmt == "q4_0x" else 512  # quant bytes, then f16 d [16]
    d = jnp.moveaxis(_f16(blocks[..., qb:qb + 32]), -1, -2)[..., None]  # [.., T, c, B, 1]
    if fmt == "q4_1x":
        w = d * q + jnp.moveaxis(_f16(blocks[..., 288:320]), -1, -2)[..., None]
    elif fmt == "q4_0x":
        w = d * (q - 8.0)
    else:
        w = d * (q - 128.0)
    return w.reshape(*lead, t * TILE, k)[..., :n, :]


def embed_rows(data: jax.Array, scales: jax.Array, fmt: str, k: int, tokens: jax.Array
               ) -> jax.Array:
    """float32 [T, K]: rows `tokens` of a packed [N, K] weight (a tied embedding): each
    token's tile is dequantized and its column taken."""
    tiles = data[tokens // TILE][:, None, :]  # [T, 1, tile bytes]: one tile per token
    sc = scales[tokens][:, None].repeat(TILE, axis=1) if fmt == "int8x" else scales
    rows = dequantize_rows(tiles, sc, fmt, TILE, k)  # [T, 16, K]
    return jnp.take_along_axis(rows, (tokens % TILE)[:, None, None], axis=1)[:, 0]
