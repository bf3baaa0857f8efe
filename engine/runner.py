"""The model runner: turns a ScheduledBatch into device arrays, runs the jitted step, samples.

One jitted entry point (`_step`): forward + sample, with the KV cache donated so it is
updated in place. All shapes are bucketed (engine.compile.Buckets). Batches with
grammar-constrained rows (structured outputs) run the same step in two halves instead, so that
the host computes the token masks while the device runs the forward.

`launch` dispatches a step and returns at once; `collect` waits for it and reads its tokens.
Overlap scheduling launches step N+1 (whose inputs may name step N's tokens as PLACEHOLDERs,
filled in on the device) before collecting step N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from engine.attention import AttentionMetadata
from engine.backend import Backend
from engine.compile import Buckets, CompileCounter, idle_batch
from engine.core.request import Request, ScheduledBatch
from engine.model.config import ModelConfig
from engine.model.llama import Params, forward
from engine.parallel.sharding import to_host
from engine.prompt_logprobs import make_prompt_step, prompt_inputs, record, wants_prompt_logprobs
from engine.sampler import SamplingMode, SamplingRow, SamplingTensors, sample
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class TokenSample:
    """The sampled token of one sequence, and its logprobs when asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


PLACEHOLDER = -1
"""A token id that stands for a token the previous step sampled and the host has not read
yet (overlap scheduling); the step takes it from `prev_tokens` on the device."""


def model_forward(cfg: ModelConfig, backend: Backend) -> Callable:
    """The model's forward bound to the backend's attention and KV write. MoE experts split
    over a mesh axis (expert parallelism) take the shard_map path over that axis, which
    needs the mesh in context when traced (`mesh_context`)."""
    attend = functools.partial(backend.attention_fn(), scale=cfg.head_dim**-0.5)
    expert_axis = backend.mesh_rules.get("expert") if backend.mesh is not None else None
    return functools.partial(forward, cfg=cfg, attend=attend, write=backend.write_kv,
                             linear=backend.linear, add_norm=backend.add_rms_norm,
                             expert_axis=expert_axis if cfg.is_moe else None)


def mesh_context(backend: Backend) -> contextlib.AbstractContextManager:
    """jax.set_mesh(the backend's mesh) while a step is traced, or nothing without one."""
    return jax.set_mesh(backend.mesh) if backend.mesh is not None else contextlib.nullcontext()


def replicated(tree: Any, backend: Backend) -> Any:
    """Step outputs whole on every device of the mesh: reading them then needs no collective
    (under multi-host serving only the leader reads them)."""
    if backend.mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(backend.mesh, PartitionSpec()))


def make_step(cfg: ModelConfig, backend: Backend, max_seqs: int, capture: tuple[int, ...] = ()):
    """The jitted step (forward + sample, KV cache donated). Precompilation builds the same
    function, so its programs are the ones the runner later finds in the compilation cache.

    Token i with src[i] >= 0 is a placeholder for prev_tokens[src[i]], the previous step's
    sampled token of that row, still on the device. The step returns its own sampled tokens
    padded to [max_seqs] for the next step, so that input has one shape.

    `capture` (EAGLE-3): `kv` is then the pair (KV cache, hidden pool [slots, C * E]), and
    the captured layers' inputs of every token are written into the pool at the token's KV
    slot (padding slots are dropped), so they are valid exactly where its K/V is."""
    fwd = model_forward(cfg, backend)

    def step(params, kv, tokens, md, logits_idx, st, prev_tokens, src, mode):
        tokens = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], tokens)
        if capture:
            kv, pool = kv
            logits, kv, aux = fwd(params, kv, tokens, md, logits_idx, capture=capture)
            kv = (kv, pool.at[md.slot_mapping].set(aux.astype(pool.dtype), mode="drop"))
        else:
            logits, kv = fwd(params, kv, tokens, md, logits_idx)
        out = sample(logits, st, mode)
        next_tokens = jnp.zeros(max_seqs, jnp.int32).at[:out.tokens.shape[0]].set(out.tokens)
        return replicated(out, backend), kv, replicated(next_tokens, backend)

    return backend.jit(step, static_argnames=("mode",), donate_argnums=(1,))


@dataclasses.dataclass
class Launched:
    """A step dispatched to the device whose sampled tokens the host has not read yet."""

    batch: ScheduledBatch
    out: Any
    """The sampler's output on the device (read by ModelRunner.collect)."""
    next_tokens: jax.Array | None
    """[max_seqs] the sampled token of each row, for the next step's placeholders."""
    rows: dict[str, int]
    """Request id -> its row, for each sequence that samples."""
    shape: tuple
    dispatched: float = 0.0
    """perf_counter() once dispatched (after any compilation)."""
    prompt: Any = None
    """Prompt logprobs on the device (engine.prompt_logprobs), when the batch asked."""


def make_split_step(cfg: ModelConfig, backend: Backend) -> tuple[Callable, Callable]:
    """The step in two jitted halves, for batches with grammar-constrained rows: the forward
    (KV cache donated) returns the logits on device, so the host fills the token bitmasks
    while the device computes; then the sample applies them."""
    fwd = model_forward(cfg, backend)

    def masked_sample(logits, st, bitmask, mode):
        return replicated(sample(logits, st, mode, bitmask), backend)

    return (backend.jit(fwd, donate_argnums=(1,)),
            backend.jit(masked_sample, static_argnames=("mode",)))


@dataclasses.dataclass
class GrammarMasks:
    """The constrained rows of one batch and how to fill their bitmasks (structured outputs).

    `fill(bitmask)` writes the allowed next tokens of row i for each i in `rows` into
    bitmask[i] (int32 [S, words]); every other row stays all ones (unconstrained).
    """

    rows: list[int]
    words: int
    fill: Callable[[np.ndarray], None]


class ModelRunner:
    # Host time spent filling grammar bitmasks, and rows filled (engine bench structured).
    mask_time_s: float = 0.0
    mask_rows: int = 0
    _split: tuple[Callable, Callable] | None = None  # built on the first constrained batch
    _prompt: Callable | None = None  # built on the first batch with prompt logprobs
    mirror: Any = None
    """Multi-host serving, on the leader: sends each step's inputs to the followers."""

    def __init__(
        self, cfg: ModelConfig, params: Params, backend: Backend, *, page_size: int,
        num_pages: int, max_num_tokens: int, max_num_seqs: int, max_model_len: int,
        kv_dtype: jnp.dtype, eos_token_ids: tuple[int, ...] = (),
        kv_place: Callable[[tuple, tuple], Any] | None = None, buckets: Buckets | None = None,
        capture: tuple[int, ...] = (),
    ) -> None:
        self.eos_token_ids = eos_token_ids
        self.cfg, self.params, self.backend = cfg, params, backend
        self.page_size, self.num_pages = page_size, num_pages
        scan = isinstance(params["layers"], dict)
        # Placed like the step's own outputs (the KV cache, next_tokens), so that the first
        # step and later ones (fed those outputs) are one program: an uncommitted first cache
        # compiled the first step's program twice, and a host array for "no previous tokens"
        # made a step after an idle engine a separate program from an overlapped one.
        where = (NamedSharding(backend.mesh, PartitionSpec()) if backend.mesh is not None
                 else jax.sharding.SingleDeviceSharding(backend.model_devices()[0]))
        self._kv_args = (cfg, num_pages, page_size, kv_dtype, scan,
                         kv_place or (lambda shape, axes: where))
        self.kv = self.allocate_kv()
        self.released_params: Any = None
        """(host copy, shardings) of the params while released (engine.memory)."""
        max_pages = -(-max_model_len // page_size)
        self.buckets = buckets or Buckets.make(max_num_tokens, max_num_seqs, max_pages,
                                               min_seqs=backend.capabilities.min_seq_bucket,
                                               min_tokens=backend.capabilities.min_token_bucket)
        self.capture = capture
        self.hidden: jax.Array | None = None
        """EAGLE-3 (`capture`): the captured layers' inputs [slots, C * E] at each token's KV
        slot (make_step), in the weights' dtype; read by engine.spec.eagle."""
        if capture:
            self.hidden = jax.device_put(np.zeros(
                (num_pages * page_size, len(capture) * cfg.hidden_size),
                params["norm"].dtype), where)
        self._step = make_step(cfg, backend, self.buckets.seqs[-1], capture)
        self._no_prev = jax.device_put(np.zeros(self.buckets.seqs[-1], np.int32), where)
        self.compiled_shapes: set[tuple] = set()
        self.step_log: list[tuple] | None = None
        """When a list (benchmarks set one), each step appends the fields of
        engine.bench.roofline.StepWork: decode-only, tokens, logit rows, context tokens,
        causal query-key pairs, seconds. A step's seconds run from its dispatch, or the end
        of the step before it if later, to when its outputs are read: the device's time
        where the device is the bottleneck (overlap scheduling). Compilation is left out:
        under overlap a new program compiles while the step before it is in flight, whose
        time then starts after the compilation (so undercounts it by what ran meanwhile)."""
        self._last_done = 0.0
        self.warmed_up = False
        """Set once start-up warm-up has run: a step that still compiles is then a warning."""
        self.serving_compiles = 0
        """Step programs compiled or loaded from the persistent cache outside warm-up."""
        self.loaded_programs: dict[tuple, jax.stages.Compiled] = {}
        """(tokens, seqs, pages, decode_only, mode) -> a step program warm-up loaded
        serialized (engine.program_store), called instead of the jitted step."""
        self._compiles = CompileCounter()

    def allocate_kv(self) -> Any:
        """A zeroed KV pool as at start-up (again after engine.memory released it)."""
        cfg, num_pages, page_size, dtype, scan, place = self._kv_args
        return self.backend.allocate_kv(cfg, num_pages, page_size, dtype, scan=scan,
                                        place=place)

    def idle_args(self, t: int, s: int, p: int, decode_only: bool,
                   mode: SamplingMode) -> tuple:
        """The step's arguments for one bucket shape on idle rows: every K/V write goes to
        the dropped padding slot. The arrays are of the kinds `launch` passes (numpy
        batches, the committed weights, KV cache and previous tokens), so a program traced
        over them is the one `launch` looks up."""
        tokens, md, logits_idx, st, _, src = idle_batch(
            t, s, p, decode_only, self.page_size, self.cfg.vocab_size, mode,
            drop_slot=self.num_pages * self.page_size)
        return (self.params, self._kv_in(), tokens, md, logits_idx, st, self._no_prev, src,
                mode)

    def _kv_in(self) -> Any:
        """The step's donated cache argument: the KV cache, with the hidden pool if any."""
        return (self.kv, self.hidden) if self.capture else self.kv

    def _kv_out(self, kv: Any) -> None:
        if self.capture:
            self.kv, self.hidden = kv
        else:
            self.kv = kv

    def run_idle(self, t: int, s: int, p: int, decode_only: bool, mode: SamplingMode) -> None:
        """Run the step of one bucket shape on idle rows and wait for it (it compiles or
        loads that program). Nothing is written to the KV cache."""
        with mesh_context(self.backend):
            out, kv, _ = self.call_step(*self.idle_args(t, s, p, decode_only, mode))
        self._kv_out(kv)
        jax.block_until_ready(out)

    def call_step(self, params: Params, kv: Any, tokens: Any, md: AttentionMetadata,
                  logits_idx: Any, st: Any, prev_tokens: Any, src: Any,
                  mode: SamplingMode) -> tuple:
        """The step: the program warm-up loaded for this shape, else the jitted step. A
        loaded program checks its arguments' types before it runs (nothing is donated
        then): one that does not match is dropped for the jitted step, with a warning."""
        key = (tokens.shape[0], md.seq_lens.shape[0], md.page_table.shape[1], md.decode_only,
               mode)
        prog = self.loaded_programs.get(key)
        if prog is not None:
            try:
                return prog(params, kv, tokens, md, logits_idx, st, prev_tokens, src)
            except (TypeError, ValueError) as e:  # raised before it runs: nothing donated
                log.warning("stored step program %s does not fit its arguments (%s): the "
                            "jitted step instead", key[:4], e)
                del self.loaded_programs[key]
        return self._step(params, kv, tokens, md, logits_idx, st, prev_tokens, src, mode)

    def lower_idle(self, t: int, s: int, p: int, decode_only: bool,
                   mode: SamplingMode) -> jax.stages.Lowered:
        """The step of one bucket shape traced and lowered (Python, holding the GIL), not
        compiled. Compiling the result (`.compile()`, which releases the GIL: warm-up runs
        several at once) stores the executable in jax's lowering cache, where the jitted
        step finds it when `launch` first meets that shape: nothing is traced or compiled
        then (tests/engine/test_warmup.py counts it)."""
        with mesh_context(self.backend):
            return self._step.trace(*self.idle_args(t, s, p, decode_only, mode)).lower()

    def _row_params(self, req: Request, ahead: int = 0) -> SamplingParams:
        """Below min_tokens, EOS and stop tokens are banned (a -100 logit bias), as vLLM does.
        `ahead`: the row samples the token after that many draft tokens."""
        p = req.params
        if len(req.output_token_ids) + ahead >= p.min_tokens:
            return p
        banned = [*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)]
        if not banned:
            return p
        return dataclasses.replace(p, logit_bias={**(p.logit_bias or {}),
                                                  **{t: -100.0 for t in banned}})

    def prepare(self, batch: ScheduledBatch) -> tuple:
        """Host-side arrays for a batch, padded to its bucket. Built with whole-array numpy
        operations over the batch's flattened tokens and pages (at 256 sequences a Python
        pass per sequence cost milliseconds of host time per step)."""
        seqs = batch.seqs
        n = len(seqs)
        lens = np.fromiter((len(sq.token_ids) for sq in seqs), np.int32, n)
        starts = np.fromiter((sq.start_pos for sq in seqs), np.int32, n)
        n_pages = np.fromiter((len(sq.page_ids) for sq in seqs), np.int32, n)
        n_tok = int(lens.sum())
        # Speculative decoding: a seq with k drafts samples k + 1 rows (ScheduledBatch.
        # logit_rows), so the sequence bucket holds the rows, not only the seqs.
        t, s_pad, p = self.buckets.shape_for(n_tok, batch.num_rows, int(n_pages.max()))
        ps = self.page_size
        ends = np.cumsum(lens, dtype=np.int32)
        page_table = np.zeros((s_pad, p), np.int32)
        prow = np.repeat(np.arange(n, dtype=np.int32), n_pages)
        pcol = np.arange(prow.size, dtype=np.int32) - np.repeat(np.cumsum(n_pages) - n_pages,
                                                                n_pages)
        page_table[prow, pcol] = np.fromiter(
            itertools.chain.from_iterable(sq.page_ids for sq in seqs), np.int32, prow.size)
        token_seq = np.zeros(t, np.int32)
        token_seq[:n_tok] = np.repeat(np.arange(n, dtype=np.int32), lens)
        ts = token_seq[:n_tok]
        positions = np.zeros(t, np.int32)
        positions[:n_tok] = np.arange(n_tok, dtype=np.int32) - (ends - lens)[ts] + starts[ts]
        pos = positions[:n_tok]
        slots = np.full(t, self.num_pages * ps, np.int32)  # padding: dropped
        slots[:n_tok] = page_table[ts, pos // ps] * ps + pos % ps
        tokens = np.zeros(t, np.int32)
        tokens[:n_tok] = np.fromiter(
            itertools.chain.from_iterable(sq.token_ids for sq in seqs), np.int32, n_tok)
        query_start = np.full(s_pad + 1, n_tok, np.int32)
        query_start[:n] = ends - lens
        seq_lens = np.zeros(s_pad, np.int32)
        seq_lens[:n] = starts + lens
        logits_idx = np.zeros(s_pad, np.int32)  # [S]: the token whose logits row r samples
        drafts = np.fromiter((sq.num_draft for sq in seqs), np.int32, n)
        last = np.asarray(batch.logit_rows(), np.int32)
        row_seq = np.repeat(np.arange(n, dtype=np.int32), drafts + 1)
        logits_idx[:row_seq.size] = (ends - 1)[row_seq] - (last[row_seq]
                                                            - np.arange(row_seq.size))
        md = AttentionMetadata(
            positions=positions, slot_mapping=slots, token_seq=token_seq,
            query_start=query_start, seq_lens=seq_lens, page_table=page_table,
            num_tokens=np.int32(n_tok), page_size=self.page_size,
            decode_only=n_tok == len(seqs),
        )
        # Row i of a seq with drafts d samples what follows its output + d[:i]: the same
        # params, seed and step (so the same noise) as a step without drafts would use there.
        rows = []
        for sq in seqs:
            req = sq.request
            out_ids = req.output_token_ids
            rows.append(SamplingRow(self._row_params(req), req.seed, len(out_ids),
                                    req.prompt_token_ids, out_ids))
            for i in range(1, sq.num_draft + 1):
                rows.append(SamplingRow(
                    self._row_params(req, i), req.seed, len(out_ids) + i, req.prompt_token_ids,
                    out_ids + sq.token_ids[len(sq.token_ids) - sq.num_draft:][:i]))
        need = SamplingMode.from_rows(rows)
        # Few programs: logprob counts are rounded up to 0, 5 or 20.
        k = next(b for b in (0, 5, MAX_LOGPROBS) if b >= need.num_logprobs)
        mode = dataclasses.replace(need, num_logprobs=k)
        st = SamplingTensors.from_rows(rows, self.cfg.vocab_size, pad_to=s_pad, mode=mode,
                                       need=need)
        return tokens, md, logits_idx, st, mode

    def execute(self, batch: ScheduledBatch, masks: GrammarMasks | None = None,
                ) -> list[TokenSample | list[TokenSample] | None]:
        """Run one step; one entry per scheduled seq (None where the seq does not sample).
        `masks`: the grammar-constrained rows, if any (else the fused step runs)."""
        return self.collect(self.launch(batch, masks=masks))

    def launch(self, batch: ScheduledBatch, prev: Launched | None = None,
               masks: GrammarMasks | None = None) -> Launched:
        """Dispatch one step without waiting for it. PLACEHOLDER tokens in the batch stand
        for the tokens `prev` sampled (overlap scheduling); a constrained step has none."""
        t_prep = time.perf_counter()
        tokens, md, logits_idx, st, mode = self.prepare(batch)
        src = np.full(tokens.shape, -1, np.int32)
        if prev is not None:  # a placeholder is only ever a sequence's newest (last) token
            off = 0
            for sq in batch.seqs:
                off += len(sq.token_ids)
                if sq.token_ids[-1] == PLACEHOLDER:
                    src[off - 1] = prev.rows[sq.request.request_id]
        shape = (tokens.shape[0], md.seq_lens.shape[0], md.page_table.shape[1], md.decode_only,
                 mode, masks is not None)
        next_tokens = None
        compiles = self._compiles.compiles
        if self.mirror is not None:  # multi-host serving: the followers run it too
            self.mirror.send(("step", (tokens, md, logits_idx, st, mode, src, prev is not None))
                             if masks is None else ("fwd", (tokens, md, logits_idx)))
        prompt = None
        if wants_prompt_logprobs(batch):  # the engine runs these without placeholders
            with mesh_context(self.backend):
                out, prompt = self._prompt_step(batch, tokens, md, logits_idx, st, mode, masks)
        elif masks is None:
            prev_tokens = self._no_prev if prev is None else prev.next_tokens
            with mesh_context(self.backend):
                out, kv, next_tokens = self.call_step(self.params, self._kv_in(), tokens, md,
                                                      logits_idx, st, prev_tokens, src, mode)
            self._kv_out(kv)
        else:
            with mesh_context(self.backend):
                out = self._constrained_step(tokens, md, logits_idx, st, mode, masks)
        rows = {sq.request.request_id: i for i, sq in zip(batch.logit_rows(), batch.seqs,
                                                          strict=True) if sq.sample}
        dispatched = time.perf_counter()
        if self._compiles.compiles > compiles:  # dispatch compiles synchronously
            self._compiled_while_serving(shape, self._compiles.compiles - compiles, t_prep)
        if shape not in self.compiled_shapes:  # it may have compiled: keep that out of the
            self._last_done = dispatched       # step in flight's time (step_log)
        return Launched(batch, out, next_tokens, rows, shape, dispatched, prompt)

    def _prompt_step(self, batch: ScheduledBatch, tokens: np.ndarray, md: AttentionMetadata,
                     logits_idx: np.ndarray, st: SamplingTensors, mode: SamplingMode,
                     masks: GrammarMasks | None) -> tuple[Any, Any]:
        if self._prompt is None:
            self._prompt = make_prompt_step(self.cfg, self.backend,
                                            model_forward(self.cfg, self.backend),
                                            functools.partial(replicated, backend=self.backend))
        words = masks.words if masks is not None else 1
        bitmask = np.full((logits_idx.shape[0], words), -1, np.int32)  # [S, W]: all allowed
        if masks is not None:
            masks.fill(bitmask)
        pin = prompt_inputs(batch, tokens.shape[0])
        out, self.kv, prompt = self._prompt(self.params, self.kv, tokens, md, pin.all_idx,
                                            pin.targets, logits_idx, st, bitmask, mode, pin.k)
        return out, prompt

    def _compiled_while_serving(self, shape: tuple, n: int, since: float) -> None:
        self.serving_compiles += n
        t, s, p, decode_only, mode, constrained = shape
        log.log(logging.WARNING if self.warmed_up else logging.INFO,
                "compiled or loaded %d step program(s) while serving (%.1fs): %d tokens, "
                "%d sequences x %d pages, %s, %s%s%s", n, time.perf_counter() - since, t, s, p,
                "decode-only" if decode_only else "with prompt tokens", mode,
                ", grammar-constrained" if constrained else "",
                "" if self.warmed_up else " (no warm-up ran: see --warmup-decode-len)")

    def collect(self, launched: Launched) -> list[TokenSample | list[TokenSample] | None]:
        """Wait for a launched step and read its samples: one entry per scheduled seq, a
        list of num_draft + 1 samples for a seq with drafts (the token after each of its last
        num_draft + 1 tokens)."""
        t0 = time.perf_counter()
        # The token ids alone when no row reports logprobs: one device-to-host copy, not
        # the sampler's four (TokenSample.logprob is then 0.0, read by nobody).
        lp = any(sq.request.params.logprobs is not None for sq in launched.batch.seqs)
        # Also reads a replicated multi-process array.
        out = to_host(launched.out if lp else launched.out.tokens)
        done = time.perf_counter()
        if self.step_log is not None:
            q = [len(sq.token_ids) for sq in launched.batch.seqs]
            ctx = [sq.start_pos + n for sq, n in zip(launched.batch.seqs, q, strict=True)]
            self.step_log.append((launched.shape[3], sum(q), len(q), sum(ctx),
                                  sum(n * c - n * (n - 1) // 2
                                      for n, c in zip(q, ctx, strict=True)),
                                  done - max(launched.dispatched, self._last_done)))
        self._last_done = done
        if launched.prompt is not None:
            record(launched.batch, *to_host(launched.prompt))
        if launched.shape not in self.compiled_shapes:
            self.compiled_shapes.add(launched.shape)
            log.debug("step shape %s first run (wait %.2fs)", launched.shape, done - t0)
        results: list[TokenSample | list[TokenSample] | None] = []
        tokens = (out.tokens if lp else out).tolist()  # Python ints, read once
        for last, sq in zip(launched.batch.logit_rows(), launched.batch.seqs, strict=True):
            if not sq.sample:
                results.append(None)
                continue
            if not lp and not sq.num_draft:  # most rows: one token, no logprobs
                results.append(TokenSample(tokens[last], 0.0, []))
                continue
            k = sq.request.params.logprobs or 0
            rows = range(last - sq.num_draft, last + 1)
            row = [TokenSample(int(out.tokens[i]), float(out.logprobs[i]),
                               [(int(a), float(b)) for a, b in
                                zip(out.top_ids[i, :k], out.top_logprobs[i, :k], strict=True)])
                   for i in rows] if lp else [TokenSample(int(out[i]), 0.0, []) for i in rows]
            results.append(row if sq.num_draft else row[0])
        return results

    def _constrained_step(self, tokens: np.ndarray, md: AttentionMetadata,
                          logits_idx: np.ndarray, st: SamplingTensors, mode: SamplingMode,
                          masks: GrammarMasks) -> Any:
        if self._split is None:
            self._split = make_split_step(self.cfg, self.backend)
        fwd, masked_sample = self._split
        # Dispatch is asynchronous: the forward runs on the device while the host fills the
        # bitmasks, which the sample (queued after it) then waits for.
        logits, self.kv = fwd(self.params, self.kv, tokens, md, logits_idx)  # [S, V]
        bitmask = np.full((logits_idx.shape[0], masks.words), -1, np.int32)  # [S, W]
        t0 = time.perf_counter()
        masks.fill(bitmask)
        self.mask_time_s += time.perf_counter() - t0
        self.mask_rows += len(masks.rows)
        if self.mirror is not None:
            self.mirror.send(("sample", (st, bitmask, mode)))
        return masked_sample(logits, st, bitmask, mode)

    def replay(self, msg: tuple, prev: Launched | None) -> Launched | None:
        """A follower's side of one of the leader's steps (engine.parallel.mirror): the same
        programs on the same inputs; the outputs are left unread. Returns the step the next
        one's placeholders refer to."""
        kind, args = msg
        with mesh_context(self.backend):
            if kind == "step":
                tokens, md, logits_idx, st, mode, src, use_prev = args
                prev_tokens = prev.next_tokens if use_prev and prev else self._no_prev
                out, kv, next_tokens = self.call_step(self.params, self._kv_in(), tokens, md,
                                                      logits_idx, st, prev_tokens, src, mode)
                self._kv_out(kv)
                return Launched(ScheduledBatch([]), out, next_tokens, {}, ())
            if self._split is None:
                self._split = make_split_step(self.cfg, self.backend)
            fwd, masked_sample = self._split
            if kind == "fwd":
                self._replay_logits, self.kv = fwd(self.params, self.kv, *args)
            else:
                masked_sample(self._replay_logits, *args)
        return prev
