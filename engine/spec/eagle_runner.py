"""The EAGLE-3 head's runner: the target runner's batch preparation (buckets, paged
metadata) over the head's own 1-layer paged KV cache, and one jitted draft step.

The step reads each row's features from the target's hidden pool (ModelRunner.hidden, at
the target KV slot of the row's position) through `fc`, or, for a chained row, the head's
own pre-norm output of the previous draft step (`src`), and returns the greedy draft token
(in target ids) and the pre-norm output at each logits row.

EagleChain runs a proposal's k drafts as one jitted program instead (one dispatch and one
fetch, not k of each): the rows that read target features draft token 1, then k - 1 chained
one-token rows run in an on-device loop, with decode-only metadata derived on the device
(engine.spec.draft_step.decode_metadata). The step-by-step drafts are its reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.backend import Backend
from engine.compile import Buckets, idle_batch
from engine.core.request import ScheduledBatch
from engine.runner import ModelRunner, mesh_context
from engine.sampler import SamplingMode
from engine.spec.draft_step import decode_metadata
from engine.spec.eagle_head import EagleConfig, head_forward


def _head_forward(ec: EagleConfig, backend: Backend):
    return functools.partial(head_forward, cfg=ec.head, write=backend.write_kv,
                             attend=functools.partial(backend.attention_fn(),
                                                      scale=ec.head.head_dim**-0.5))


def make_draft_step(ec: EagleConfig, backend: Backend):
    """The jitted draft step (the head's K/V donated)."""
    fwd = _head_forward(ec, backend)

    def step(params, embed, kv, pool, tokens, md, logits_idx, feature_slots, prev, src):
        feats = pool[feature_slots]  # [T, C * Et]
        hidden = jnp.einsum("tc,ce->te", feats, params["fc"])  # [T, E]
        fed = prev[jnp.maximum(src, 0)]  # [T, E]: chained rows' previous output
        hidden = jnp.where((src >= 0)[:, None], fed.astype(hidden.dtype), hidden)
        return fwd(params, embed, kv, tokens, hidden, md, logits_idx)

    return backend.jit(step, donate_argnums=(2,))


class EagleRunner(ModelRunner):
    """A ModelRunner over the head (its KV pool, buckets and `prepare`); `draft` runs it."""

    def __init__(self, ec: EagleConfig, params: dict[str, Any], target: ModelRunner,
                 backend: Backend, *, num_pages: int, max_model_len: int,
                 buckets: Buckets | None = None) -> None:
        # "layers": () lets the base class see an unrolled 1-layer model (its KV layout);
        # its own step (a Llama forward) is never run.
        super().__init__(ec.head, {**params, "layers": ()}, backend,
                         page_size=target.page_size, num_pages=num_pages,
                         max_num_tokens=target.buckets.tokens[-1],
                         max_num_seqs=target.buckets.seqs[-1], max_model_len=max_model_len,
                         kv_dtype=params["norm"].dtype, buckets=buckets)
        self.ec, self.target = ec, target
        self._draft = make_draft_step(ec, backend)
        self._prev: jax.Array | None = None  # [S, E] the last draft step's outputs
        self._zeros: dict[int, jax.Array] = {}  # s -> [s, E] zeros: "nothing to feed back"
        self.where = jax.tree.leaves(self.kv)[0].sharding

    def _zeros_for(self, s: int) -> jax.Array:
        if s not in self._zeros:  # committed like the step's outputs: one program for both
            self._zeros[s] = jax.device_put(
                np.zeros((s, self.ec.head.hidden_size), self.params["norm"].dtype), self.where)
        return self._zeros[s]

    def _args(self, tokens: np.ndarray, md: Any, logits_idx: np.ndarray,
              feature_slots: np.ndarray, prev: jax.Array, src: np.ndarray) -> tuple:
        return (self.params, self.target.params["embed"], self.kv[0], self.target.hidden,
                tokens, md, logits_idx, feature_slots, prev, src)

    def draft(self, batch: ScheduledBatch, feature_slots: list[int], chain: bool
              ) -> list[int] | None:
        """Run the head on `batch`. feature_slots[i]: the target KV slot whose features
        token i reads (unused for a chained row); `chain`: every seq is one token fed the
        previous draft step's output of its row (the same seqs, in the same order). Returns
        the draft token of each seq when they sample (without waiting otherwise)."""
        tokens, md, logits_idx, _, _ = self.prepare(batch)
        t, s = tokens.shape[0], logits_idx.shape[0]
        slots = np.zeros(t, np.int32)  # [T]; padding reads slot 0 and writes nothing
        slots[:len(feature_slots)] = feature_slots
        src = np.full(t, -1, np.int32)  # [T]
        n = len(batch.seqs)
        if chain:
            src[:n] = np.arange(n, dtype=np.int32)
        prev = self._prev if chain and self._prev is not None else self._zeros_for(s)
        with mesh_context(self.backend):
            ids, self._prev, kv = self._draft(*self._args(tokens, md, logits_idx, slots, prev,
                                                          src))
        self.kv = [kv]
        if not batch.seqs[0].sample:
            return None
        return np.asarray(ids)[:n].tolist()

    def warm_up(self, grid: list[tuple[int, int, int, bool]]) -> int:
        """Compile the draft step for each (tokens, seqs, pages, decode-only) shape of `grid`
        (engine.compile.proposer_grid) before serving; returns the programs."""
        for t, s, p, dec in grid:
            tokens, md, logits_idx, _, _, _ = idle_batch(
                t, s, p, dec, self.page_size, self.cfg.vocab_size, SamplingMode(),
                drop_slot=self.num_pages * self.page_size)
            args = self._args(tokens, md, logits_idx, np.zeros(t, np.int32), self._zeros_for(s),
                              np.full(t, -1, np.int32))
            with mesh_context(self.backend):
                self._draft.trace(*args).lower().compile()
        return len(grid)


def make_draft_chain(ec: EagleConfig, backend: Backend, page_size: int, drop_slot: int,
                     vocab_size: int, unroll: bool = False):
    """The jitted k drafts of a proposal (the head's K/V donated): (params, embed, kv, pool,
    tokens [T], md, logits_idx [S], feature_slots [T], k static) -> (drafts i32 [S, k], the
    last draft row's pre-norm outputs [S, E], kv). `md`: one token a sequence (the rows at
    L - 2, reading target features); draft j + 1 is the one-token row at the next position
    fed draft j and the row's previous output. A draft outside [0, vocab_size) becomes 0,
    as the step-by-step proposer turns it (before feeding it back). `unroll`: the chained
    rows as straight-line code instead of an XLA while loop (the backend option
    draft_unroll, as a draft model's program: engine.spec.draft_step)."""
    fwd = _head_forward(ec, backend)

    def valid(tok: jax.Array) -> jax.Array:
        return jnp.where((tok >= 0) & (tok < vocab_size), tok, 0)

    def program(params, embed, kv, pool, tokens, md, logits_idx, feature_slots, k):
        hidden = jnp.einsum("tc,ce->te", pool[feature_slots], params["fc"])  # [T, E]
        first, out, kv = fwd(params, embed, kv, tokens, hidden, md, logits_idx)
        live = md.seq_lens > 0  # [S]: padding rows stay length 0, their writes dropped
        rows = jnp.arange(first.shape[0], dtype=jnp.int32)
        drafts = jnp.zeros((k, first.shape[0]), jnp.int32).at[0].set(valid(first))

        def body(i, carry):  # row i (1-based draft i + 1): input draft i at position lens
            kv, drafts, out, lens = carry
            dmd = decode_metadata(md.page_table, lens, live, page_size, drop_slot)
            tok, nxt, kv = fwd(params, embed, kv, drafts[i - 1], out.astype(hidden.dtype),
                               dmd, rows)
            return kv, drafts.at[i].set(valid(tok)), nxt.astype(out.dtype), lens + 1

        kv, drafts, out, _ = jax.lax.fori_loop(1, k, body, (kv, drafts, out, md.seq_lens),
                                               unroll=unroll)
        return drafts.T, out, kv

    return backend.jit(program, static_argnames=("k",), donate_argnums=(2,))


class EagleChain:
    """Runs the fused k-draft program on an EagleRunner (its params, K/V and the target's
    feature pool); `vocab_size`: the target's; `unroll`: its loop unrolled."""

    def __init__(self, runner: EagleRunner, vocab_size: int, unroll: bool = False) -> None:
        self.runner = runner
        self._program = make_draft_chain(runner.ec, runner.backend, runner.page_size,
                                         runner.num_pages * runner.page_size, vocab_size,
                                         unroll)

    def _args(self, tokens: np.ndarray, md: Any, logits_idx: np.ndarray,
              feature_slots: np.ndarray) -> tuple:
        r = self.runner
        return (r.params, r.target.params["embed"], r.kv[0], r.target.hidden, tokens, md,
                logits_idx, feature_slots)

    def __call__(self, batch: ScheduledBatch, feature_slots: list[int], k: int) -> np.ndarray:
        """k drafts after each seq of `batch` (one token each, at L - 2 of its request;
        feature_slots[i]: the target KV slot of that position) -> i32 [len(batch.seqs), k].
        The seqs' pages must cover k - 1 positions past their token."""
        r = self.runner
        tokens, md, logits_idx, _, _ = r.prepare(batch)  # the sampling tensors go unused
        slots = np.zeros(tokens.shape[0], np.int32)  # padding reads slot 0, writes nothing
        slots[:len(feature_slots)] = feature_slots
        with mesh_context(r.backend):
            drafts, r._prev, kv = self._program(*self._args(tokens, md, logits_idx, slots),
                                                k=k)
        r.kv = [kv]
        return np.asarray(drafts)[:len(batch.seqs)]

    def lower_idle(self, t: int, s: int, p: int, decode_only: bool,
                   k: int) -> jax.stages.Lowered:
        """The program of one shape of its first forward (t tokens, s seqs, p pages), traced
        and lowered on idle rows for warm-up (compiling it stores the executable the first
        call of that shape finds); idle rows have length 0, so a run would write no K/V."""
        r = self.runner
        tokens, md, logits_idx, *_ = idle_batch(t, s, p, decode_only, r.page_size,
                                                r.cfg.vocab_size, SamplingMode(),
                                                drop_slot=r.num_pages * r.page_size)
        with mesh_context(r.backend):
            return self._program.trace(*self._args(tokens, md, logits_idx,
                                                   np.zeros(t, np.int32)), k=k).lower()
