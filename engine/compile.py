"""Compilation: shape buckets, the programs they make reachable, idle batches of each shape
(what warm-up runs and precompilation lowers against), and the persistent compilation cache.

Every jitted step sees only bucketed shapes, so the number of programs is bounded:
token count T, sequence count S and pages per sequence P are each rounded up to a
power of two (from a floor), capped at their maxima. Steps of `wide_tokens` tokens or more
that are not decode-only take the largest sequence bucket whatever their sequence count.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from engine.attention import AttentionMetadata
from engine.sampler import SamplingMode, SamplingTensors

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


PROMPT_MIN_TOKENS = 16
"""Steps with prompt tokens take a token bucket of at least this many: smaller buckets (a
backend's min_token_bucket below 16: the CPU's) serve decode-only steps alone, so they add
decode programs only, not one per small prompt chunk too (which warm-up would not cover)."""

PAGE_BUCKETS = ("pow2", "max")


@dataclasses.dataclass(frozen=True)
class Buckets:
    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    pages: tuple[int, ...]
    wide_tokens: int = WIDE_TOKENS

    @classmethod
    def make(cls, max_tokens: int, max_seqs: int, max_pages: int, *, min_tokens: int = 16,
             min_seqs: int = 4, min_pages: int = 4, page_buckets: str = "pow2",
             wide_tokens: int = WIDE_TOKENS) -> Buckets:
        """Token buckets are powers of two from min_tokens (16, or fewer where a backend's
        decode step should compute fewer padded rows: the CPU's option), up to max_tokens
        rounded to a multiple of 16. Page
        buckets: 'pow2', powers of two up to max_pages; 'max', max_pages alone (one page
        table width for every step, for kernels that read only each sequence's own pages)."""
        if page_buckets not in PAGE_BUCKETS:
            raise ValueError(f"page_buckets must be one of {PAGE_BUCKETS}, got {page_buckets!r}")
        max_tokens = -(-max_tokens // 16) * 16
        return cls(
            tokens=_pow2_buckets(min(min_tokens, max_tokens), max_tokens),
            seqs=_pow2_buckets(min(min_seqs, max_seqs), max_seqs),
            pages=(_pow2_buckets(min(min_pages, max_pages), max_pages)
                   if page_buckets == "pow2" else (max_pages,)),
            wide_tokens=wide_tokens,
        )

    def shape_for(self, num_tokens: int, num_seqs: int, num_pages: int) -> tuple[int, int, int]:
        prompt = num_tokens > num_seqs
        t = round_up(max(num_tokens, PROMPT_MIN_TOKENS) if prompt else num_tokens, self.tokens)
        wide = t >= self.wide_tokens and prompt  # prompt tokens in a wide step
        return (t, self.seqs[-1] if wide else round_up(num_seqs, self.seqs),
                round_up(num_pages, self.pages))


def reachable(buckets: Buckets) -> list[tuple[int, int, int, bool]]:
    """(tokens, seqs, pages, decode_only) programs a batch can need. A sequence brings at
    least one token, so the sequence bucket's smallest member (the previous bucket + 1) must
    fit in the token bucket; a decode-only step (n tokens for n sequences) is a separate
    program where some n rounds up to both buckets. Steps with prompt tokens of `wide_tokens`
    or more take the largest sequence bucket only (Buckets.shape_for), whatever their count;
    token buckets below PROMPT_MIN_TOKENS are decode-only."""
    out = []
    for t in buckets.tokens:
        wide = t >= buckets.wide_tokens
        for s in buckets.seqs:
            mixed = s == buckets.seqs[-1] if wide else _lowest(s, buckets.seqs) <= t
            mixed &= t >= PROMPT_MIN_TOKENS  # (the largest bucket is always >= 16)
            both = max(_lowest(t, buckets.tokens), _lowest(s, buckets.seqs)) <= min(t, s)
            for decode_only in (False,) * mixed + (True,) * both:
                out.extend((t, s, p, decode_only) for p in buckets.pages)
    return out


def _lowest(b: int, buckets: tuple[int, ...]) -> int:
    """Smallest count that rounds up to bucket b."""
    i = buckets.index(b)
    return buckets[i - 1] + 1 if i else 1


def idle_batch(t: int, s: int, p: int, decode_only: bool, page: int, vocab: int,
               mode: SamplingMode, max_seqs: int | None = None, drop_slot: int = 0) -> tuple:
    """A step's (tokens, md, logits_idx, st, prev_tokens, src) as ModelRunner.launch makes
    them, for idle rows: no sequence has a token, and every K/V write goes to `drop_slot`
    (the runner's padding slot, which the write drops). prev_tokens has the runner's largest
    sequence bucket."""
    i32 = np.int32
    md = AttentionMetadata(
        positions=np.zeros(t, i32), slot_mapping=np.full(t, drop_slot, i32),
        token_seq=np.zeros(t, i32), query_start=np.zeros(s + 1, i32), seq_lens=np.zeros(s, i32),
        page_table=np.zeros((s, p), i32), num_tokens=i32(0), page_size=page,
        decode_only=decode_only)
    st = SamplingTensors.from_rows([], vocab, pad_to=s, mode=mode)
    return (np.zeros(t, i32), md, np.zeros(s, i32), st, np.zeros(max_seqs or s, i32),
            np.full(t, -1, i32))


def abstract_batch(t: int, s: int, p: int, decode_only: bool, page: int, vocab: int,
                   mode: SamplingMode, sharding: Any, max_seqs: int | None = None) -> tuple:
    """ShapeDtypeStructs of idle_batch's arrays (what precompilation lowers against)."""
    concrete = idle_batch(t, s, p, decode_only, page, vocab, mode, max_seqs)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=sharding), concrete)


def step_buckets(scheduler: Any, max_pages: int, min_seqs: int, min_tokens: int = 16
                 ) -> Buckets:
    """The buckets of an engine's steps, from its SchedulingOptions (engine.config)."""
    s = scheduler
    return Buckets.make(s.chunked_prefill_size, s.max_running_requests, max_pages,
                        min_tokens=min_tokens, min_seqs=min_seqs, page_buckets=s.page_buckets,
                        wide_tokens=s.wide_tokens)


def warmup_grid(buckets: Buckets, page: int, max_len: int,
                prompt_steps: bool) -> list[tuple[int, int, int, bool]]:
    """The programs warm-up compiles: the decode-only steps of every (sequence, page) bucket
    up to `max_len` tokens of context and, with `prompt_steps`, the wide steps with prompt
    tokens (token buckets from Buckets.wide_tokens up: a loaded server's prefill chunks) for
    the same page buckets."""
    top = round_up(min(-(-max_len // page), buckets.pages[-1]), buckets.pages)
    return [(t, s, p, dec) for t, s, p, dec in reachable(buckets)
            if p <= top and (dec or (prompt_steps and t >= buckets.wide_tokens))]


def verify_grid(buckets: Buckets, page: int, max_len: int, max_batch: int, k: int
                ) -> list[tuple[int, int, int, bool]]:
    """The target's speculative verify steps warm-up adds (speculation on): n <= max_batch
    decodes with up to k drafts each are m rows of one token, n < m <= n (1 + k), so
    neither a decode-only step nor one with prompt tokens (Buckets.shape_for: T and S
    rounded from m alone)."""
    top = round_up(min(-(-max_len // page), buckets.pages[-1]), buckets.pages)
    rows = range(2, min(max_batch * (1 + k), buckets.seqs[-1]) + 1)
    shapes = sorted({(round_up(m, buckets.tokens), round_up(m, buckets.seqs)) for m in rows})
    return [(t, s, p, False) for t, s in shapes for p in buckets.pages if p <= top]


def proposer_grid(buckets: Buckets, page: int, max_len: int, max_batch: int
                  ) -> list[tuple[int, int, int, bool]]:
    """A proposer's own steps (a draft model's or an EAGLE-3 head's runner, with its own
    buckets): at most max_batch sequences (speculation stops above it), one-token rows and
    catch-up rows of any length up to a step's budget (wide ones take the largest sequence
    bucket, as every wide step with prompt tokens does)."""
    top = round_up(min(-(-max_len // page), buckets.pages[-1]), buckets.pages)
    most = round_up(min(max_batch, buckets.seqs[-1]), buckets.seqs)
    return [(t, s, p, dec) for t, s, p, dec in reachable(buckets)
            if p <= top and (s <= most or (not dec and t >= buckets.wide_tokens))]


class CompileCounter:
    """Programs this process compiled or loaded from the persistent cache (jax.monitoring's
    events), counted from when the first counter was made. Either stalls a serving step: a
    compilation for seconds, a cache load for a fraction of one."""

    compiles: int = 0
    seconds: float = 0.0
    _registered = False
    _lock = threading.Lock()  # warm-up compiles on several threads
    _EVENTS = ("/jax/core/compile/backend_compile_duration",
               "/jax/compilation_cache/cache_retrieval_time_sec")

    def __init__(self) -> None:
        if not CompileCounter._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._event)
            CompileCounter._registered = True

    @staticmethod
    def _event(event: str, duration: float, **_: object) -> None:
        if event in CompileCounter._EVENTS:
            with CompileCounter._lock:
                CompileCounter.compiles += 1
                CompileCounter.seconds += duration


def enable_persistent_cache(cache_dir: Path, platform: str) -> None:
    """Compiled programs are kept on disk, so a second start skips XLA compilation; on the
    GPU and TPU only. jaxlib 0.10's CPU cache can store a program without one of its kernels
    when the process compiled other programs first: a later process loads it and fails at
    run time ("NOT_FOUND: Function broadcast_compare_fusion not found"; the CUDA backend's
    interpreted speculation test, run after the other CUDA tests, wrote such an entry). A CPU
    program compiles in about a second, so the CPU (and the NPU's torch executor, whose JAX
    programs are CPU ones) keeps nothing on disk."""
    if platform not in ("gpu", "tpu"):
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
