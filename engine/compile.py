"""Compilation: shape buckets, the persistent compilation cache, and precompilation.

Every jitted step sees only bucketed shapes, so the number of programs is bounded:
token count T, sequence count S and pages per sequence P are each rounded up to a
power of two (from a floor), capped at their maxima. Steps of `wide_tokens` tokens or more
that are not decode-only take the largest sequence bucket whatever their sequence count.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def round_up(x: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if x <= b:
            return b
    raise ValueError(f"{x} exceeds the largest bucket {buckets[-1]}")


WIDE_TOKENS = 2048
"""From this token bucket up, a step with prompt tokens pads its sequences to the largest
sequence bucket: one program per token and page bucket instead of one per sequence bucket
too. Replaying the scheduler of a 1000-prompt offline run (1024 in / 1024 out, 256
running) gives the 13 programs the GPU run compiled, 6 of them 8192-token prompt steps in
5 sequence buckets; with this rule, 9 programs. An 8k-token step costs ~250 ms on an
H200; by arithmetic, 240 padded logit rows of an 8B model's 128k vocabulary cost < 1 ms."""


@dataclasses.dataclass(frozen=True)
class Buckets:
    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    pages: tuple[int, ...]
    wide_tokens: int = WIDE_TOKENS

    @classmethod
    def make(cls, max_tokens: int, max_seqs: int, max_pages: int, *, min_tokens: int = 16,
             min_seqs: int = 4, min_pages: int = 4) -> Buckets:
        """Token buckets are multiples of 16 (the attention chunk divides them)."""
        max_tokens = -(-max_tokens // 16) * 16
        return cls(
            tokens=_pow2_buckets(min(min_tokens, max_tokens), max_tokens),
            seqs=_pow2_buckets(min(min_seqs, max_seqs), max_seqs),
            pages=_pow2_buckets(min(min_pages, max_pages), max_pages),
        )

    def shape_for(self, num_tokens: int, num_seqs: int, num_pages: int) -> tuple[int, int, int]:
        t = round_up(num_tokens, self.tokens)
        wide = t >= self.wide_tokens and num_tokens > num_seqs  # prompt tokens in a wide step
        return (t, self.seqs[-1] if wide else round_up(num_seqs, self.seqs),
                round_up(num_pages, self.pages))


def enable_persistent_cache(cache_dir: Path) -> None:
    """Compiled programs are kept on disk, so a second start skips XLA compilation."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
