"""Threefry-2x32 in torch, bit for bit JAX's (jax.random's default PRNG), for the sampler.

uint32 values are held in int64 tensors (0 <= x < 2**32) and masked after every add and
shift: torch's own uint32 type lacks most arithmetic. A key is its data, [..., 2].
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: torch.Tensor, d: int) -> torch.Tensor:
    return ((x << d) | (x >> (32 - d))) & MASK


def threefry2x32(k1: torch.Tensor, k2: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Threefry-2x32 hash (20 rounds) of counts (x1, x2) under key (k1, k2); broadcasts."""
    ks = (k1, k2, k1 ^ k2 ^ 0x1BD11BDA)
    a, b = (x1 + ks[0]) & MASK, (x2 + ks[1]) & MASK
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            a = (a + b) & MASK
            b = _rotl(b, r) ^ a
        a = (a + ks[(i + 1) % 3]) & MASK
        b = (b + ks[(i + 2) % 3] + i + 1) & MASK
    return a, b


def fold_in(keys: torch.Tensor, msgs: torch.Tensor) -> torch.Tensor:
    """keys [..., 2], msgs [...] (any integer type, taken as uint32) -> keys [..., 2]:
    the hash of the counts (0, msg), as jax.random.fold_in."""
    msgs = msgs.to(torch.int64) & MASK
    a, b = threefry2x32(keys[..., 0], keys[..., 1], torch.zeros_like(msgs), msgs)
    return torch.stack([a, b], dim=-1)


def _hash_iota(keys: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., 2] -> the hash pair [..., *shape] of each flat index of `shape` (a 64-bit
    count split into high and low words), as JAX's partitionable threefry."""
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=torch.int64, device=keys.device).reshape(shape)
    lead = keys.shape[:-1]
    k1 = keys[..., 0].reshape(*lead, *([1] * len(shape)))
    k2 = keys[..., 1].reshape(*lead, *([1] * len(shape)))
    return threefry2x32(k1, k2, idx >> 32, idx & MASK)


def random_bits(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """keys [..., 2] -> 32 random bits [..., *shape] per key (the hash pair, xor-ed)."""
    a, b = _hash_iota(keys, shape)
    return a ^ b


def split(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """keys [..., 2] -> new keys [..., *shape, 2] (the hash pair of each index)."""
    return torch.stack(_hash_iota(keys, shape), dim=-1)
