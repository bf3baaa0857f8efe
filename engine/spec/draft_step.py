"""A draft model's k greedy proposals as one jitted program: one dispatch and one fetch a
step instead of k (each of which waited for its tokens on the host).

The program's first forward is an ordinary ragged step over each sequence's uncomputed
tokens (the drafts the target accepted last time, which the draft model never fed itself,
then the last known token): its argmax at each sequence's last token is draft 1. Then k - 1
decode steps run in an on-device loop, each feeding the previous argmax back as the next
input at the next position, with decode-only metadata derived on the device from the first
step's page table and lengths, so they take the backend's decode attention. K/V is written
for every input: the sequence's tokens and drafts 1 .. k - 1 (draft k is only an output).

Equal, token for token, to the step-by-step proposer's drafts (tests/engine/spec/
test_draft_step.py), which runs the same forwards one dispatch at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engine.attention import AttentionMetadata
from engine.compile import idle_batch
from engine.core.request import ScheduledBatch
from engine.parallel.sharding import to_host
from engine.runner import ModelRunner, mesh_context, model_forward, replicated
from engine.sampler import SamplingMode


def decode_metadata(page_table: jax.Array, lens: jax.Array, live: jax.Array,
                     page_size: int, drop_slot: int) -> AttentionMetadata:
    """One new token per live sequence at position lens[s] (sequence s = token s): the
    metadata of a decode step, padded like the runner's (padding rows: length 0, writes
    dropped), derived on the device (the chained steps of a draft model's program and of
    an EAGLE-3 head's, engine.spec.eagle_runner). page_table [S, P], lens [S] i32,
    live [S] bool -> metadata with T = S."""
    s = lens.shape[0]
    rows = jnp.arange(s, dtype=jnp.int32)  # [S]
    n = live.sum(dtype=jnp.int32)  # live rows are the first n (the runner's order)
    pos = jnp.where(live, lens, 0)  # [S]
    page = jnp.take_along_axis(page_table, (pos // page_size)[:, None], axis=1)[:, 0]  # [S]
    slots = jnp.where(live, page * page_size + pos % page_size, drop_slot)
    return AttentionMetadata(
        positions=pos, slot_mapping=slots, token_seq=jnp.where(live, rows, 0),
        query_start=jnp.minimum(jnp.arange(s + 1, dtype=jnp.int32), n),
        seq_lens=jnp.where(live, lens + 1, 0), page_table=page_table, num_tokens=n,
        page_size=page_size, decode_only=True)


def make_draft_program(runner: ModelRunner, vocab_size: int, unroll: bool = False):
    """The jitted program over `runner`'s model and KV cache (donated): (params, kv, tokens
    [T], md, logits_idx [S], k static) -> (drafts i32 [S, k], kv). `vocab_size`: the
    target's; a draft model's argmax past it (a larger padded vocabulary) becomes 0.
    `unroll`: the k - 1 decode steps as straight-line code instead of an XLA while loop (the
    backend option draft_unroll). On an H200 (2026-12-04) the 8B draft's four forwards took
    40.0 ms in the loop, where four decode steps take about 18, and 37.7 ms unrolled
    (scripts/gpu/spec.sh same-unrolled, one run each): the loop (a copy of its carried KV
    pool each iteration, say) is not what costs the rest."""
    fwd = model_forward(runner.cfg, runner.backend)
    page_size, drop = runner.page_size, runner.num_pages * runner.page_size

    def greedy(logits: jax.Array) -> jax.Array:  # f32 [S, V] -> i32 [S]
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jnp.where(tok < vocab_size, tok, 0)

    def program(params, kv, tokens, md, logits_idx, k):
        live = md.seq_lens > 0  # [S]
        logits, kv = fwd(params, kv, tokens, md, logits_idx)
        first = greedy(logits)  # [S]: draft 1
        drafts = jnp.zeros((k, first.shape[0]), jnp.int32).at[0].set(first)  # [k, S]
        rows = jnp.arange(first.shape[0], dtype=jnp.int32)

        def body(i, carry):  # input: draft i (0-based i - 1 done), at position lens
            kv, drafts, lens = carry
            dmd = decode_metadata(md.page_table, lens, live, page_size, drop)
            logits, kv = fwd(params, kv, drafts[i - 1], dmd, rows)
            return kv, drafts.at[i].set(greedy(logits)), lens + 1

        kv, drafts, _ = jax.lax.fori_loop(1, k, body, (kv, drafts, md.seq_lens),
                                          unroll=unroll)
        return replicated(drafts.T, runner.backend), kv

    return runner.backend.jit(program, static_argnames=("k",), donate_argnums=(1,))


class DraftProgram:
    """Runs the fused proposal program on a draft model's runner (its params and KV)."""

    def __init__(self, runner: ModelRunner, vocab_size: int, unroll: bool = False) -> None:
        self.runner = runner
        self._program = make_draft_program(runner, vocab_size, unroll)

    def __call__(self, batch: ScheduledBatch, k: int) -> np.ndarray:
        """k greedy drafts after each seq of `batch` (every seq samples: its token_ids end
        with the request's last known token) -> i32 [len(batch.seqs), k]. The seqs' pages
        must cover k - 1 positions past their tokens."""
        r = self.runner
        tokens, md, logits_idx, _, _ = r.prepare(batch)  # the sampling tensors go unused
        with mesh_context(r.backend):
            drafts, r.kv = self._program(r.params, r.kv, tokens, md, logits_idx, k=k)
        return np.asarray(to_host(drafts))[:len(batch.seqs)]

    def lower_idle(self, t: int, s: int, p: int, decode_only: bool,
                   k: int) -> jax.stages.Lowered:
        """The program of one bucket shape (first forward: t tokens, s sequences, p pages)
        traced and lowered on idle rows, for warm-up: compiling the result stores the
        executable where the first call of that shape finds it (as ModelRunner.lower_idle).
        Idle rows have length 0, so a run of it would write no K/V."""
        r = self.runner
        tokens, md, logits_idx, *_ = idle_batch(t, s, p, decode_only, r.page_size,
                                                r.cfg.vocab_size, SamplingMode(),
                                                drop_slot=r.num_pages * r.page_size)
        with mesh_context(r.backend):
            return self._program.trace(r.params, r.kv, tokens, md, logits_idx, k=k).lower()
