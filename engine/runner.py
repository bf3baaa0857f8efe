"""The model runner: turns a ScheduledBatch into device arrays, runs the jitted step, samples.

One jitted entry point (`_step`): forward + sample, with the KV cache donated so it is
updated in place. All shapes are bucketed (engine.compile.Buckets).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.attention import AttentionMetadata
from engine.backend import Backend
from engine.compile import Buckets
from engine.core.request import Request, ScheduledBatch
from engine.model.config import ModelConfig
from engine.model.llama import Params, forward
from engine.parallel.sharding import to_host
from engine.sampler import SamplingMode, SamplingRow, SamplingTensors, sample
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenSample:
    """The sampled token of one sequence, and its logprobs when asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def make_step(cfg: ModelConfig, backend: Backend):
    """The jitted step (forward + sample, KV cache donated). Precompilation builds the same
    function, so its programs are the ones the runner later finds in the compilation cache."""
    attend = functools.partial(backend.attention_fn(), scale=cfg.head_dim**-0.5)
    fwd = functools.partial(forward, cfg=cfg, attend=attend, write=backend.write_kv)

    def step(params, kv, tokens, md, logits_idx, st, mode):
        logits, kv = fwd(params, kv, tokens, md, logits_idx)
        return sample(logits, st, mode), kv

    return jax.jit(step, static_argnames=("mode",), donate_argnums=(1,))


class ModelRunner:
    def __init__(
        self, cfg: ModelConfig, params: Params, backend: Backend, *, page_size: int,
        num_pages: int, max_num_tokens: int, max_num_seqs: int, max_model_len: int,
        kv_dtype: jnp.dtype, eos_token_ids: tuple[int, ...] = (),
        kv_place: Callable[[tuple, tuple], Any] | None = None,
    ) -> None:
        self.eos_token_ids = eos_token_ids
        self.cfg, self.params, self.backend = cfg, params, backend
        self.page_size, self.num_pages = page_size, num_pages
        scan = isinstance(params["layers"], dict)
        self.kv = backend.allocate_kv(cfg, num_pages, page_size, kv_dtype, scan=scan,
                                      place=kv_place)
        max_pages = -(-max_model_len // page_size)
        self.buckets = Buckets.make(max_num_tokens, max_num_seqs, max_pages)
        self._step = make_step(cfg, backend)
        self.compiled_shapes: set[tuple] = set()

    def _row_params(self, req: Request) -> SamplingParams:
        """Below min_tokens, EOS and stop tokens are banned (a -100 logit bias), as vLLM does."""
        p = req.params
        if len(req.output_token_ids) >= p.min_tokens:
            return p
        banned = [*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)]
        if not banned:
            return p
        return dataclasses.replace(p, logit_bias={**(p.logit_bias or {}),
                                                  **{t: -100.0 for t in banned}})

    def prepare(self, batch: ScheduledBatch) -> tuple:
        """Host-side arrays for a batch, padded to its bucket."""
        seqs = batch.seqs
        n_tok = batch.num_tokens
        n_pages = max(len(s.page_ids) for s in seqs)
        t, s_pad, p = self.buckets.shape_for(n_tok, len(seqs), n_pages)
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.full(t, self.num_pages * self.page_size, np.int32)  # padding: dropped
        token_seq = np.zeros(t, np.int32)
        query_start = np.full(s_pad + 1, n_tok, np.int32)
        seq_lens = np.zeros(s_pad, np.int32)
        page_table = np.zeros((s_pad, p), np.int32)
        logits_idx = np.zeros(s_pad, np.int32)
        off = 0
        for i, sq in enumerate(seqs):
            n = len(sq.token_ids)
            pos = np.arange(sq.start_pos, sq.start_pos + n, dtype=np.int32)
            pages = np.asarray(sq.page_ids, np.int32)
            ps = self.page_size
            tokens[off:off + n] = sq.token_ids
            positions[off:off + n] = pos
            slots[off:off + n] = pages[pos // ps] * ps + pos % ps
            token_seq[off:off + n] = i
            query_start[i] = off
            seq_lens[i] = sq.start_pos + n
            page_table[i, :len(pages)] = pages
            logits_idx[i] = off + n - 1
            off += n
        md = AttentionMetadata(
            positions=positions, slot_mapping=slots, token_seq=token_seq,
            query_start=query_start, seq_lens=seq_lens, page_table=page_table,
            num_tokens=np.int32(n_tok), page_size=self.page_size,
            decode_only=n_tok == len(seqs),
        )
        rows = [
            SamplingRow(params=self._row_params(sq.request), seed=sq.request.seed,
                        step=len(sq.request.output_token_ids),
                        prompt_ids=sq.request.prompt_token_ids,
                        output_ids=sq.request.output_token_ids)
            for sq in seqs
        ]
        need = SamplingMode.from_rows(rows)
        # Few programs: logprob counts are rounded up to 0, 5 or 20.
        k = next(b for b in (0, 5, MAX_LOGPROBS) if b >= need.num_logprobs)
        mode = dataclasses.replace(need, num_logprobs=k)
        st = SamplingTensors.from_rows(rows, self.cfg.vocab_size, pad_to=s_pad, mode=mode)
        return tokens, md, logits_idx, st, mode

    def execute(self, batch: ScheduledBatch) -> list[TokenSample | None]:
        """Run one step; one entry per scheduled seq (None where the seq does not sample)."""
        tokens, md, logits_idx, st, mode = self.prepare(batch)
        shape = (tokens.shape[0], md.seq_lens.shape[0], md.page_table.shape[1], md.decode_only,
                 mode)
        t0 = time.perf_counter()
        out, self.kv = self._step(self.params, self.kv, tokens, md, logits_idx, st, mode)
        out = to_host(out)  # also reads a replicated multi-process array
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            log.debug("step shape %s first run %.2fs", shape, time.perf_counter() - t0)
        results: list[TokenSample | None] = []
        for i, sq in enumerate(batch.seqs):
            if not sq.sample:
                results.append(None)
                continue
            k = sq.request.params.logprobs or 0
            top = [(int(a), float(b)) for a, b in zip(out.top_ids[i, :k], out.top_logprobs[i, :k],
                                                      strict=True)]
            results.append(TokenSample(int(out.tokens[i]), float(out.logprobs[i]), top))
        return results
