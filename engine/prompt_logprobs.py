"""Prompt logprobs, computed in the prompt's own steps (chunked prefill included).

A step with a row that asks for them runs the forward over every token of the batch, not only
the last of each row: logits [T, V] -> log-softmax -> the logprob of the token that follows
each position (the next prompt token, known on the host) and the top K. The sampled rows take
their logits from the same array, so the step samples as the fused one does. Not a second
pass: the prompt's K/V are written once, by this step.

Position p's logits score token p + 1: the prompt token at p + 1 gets its logprob from the
step that computes position p. Token 0 has none (nothing precedes it). A request that asks
for them skips the prefix cache from its first wanted position on (cached positions are not
computed, so they would have no logits), and a preempted one recomputes the same values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.backend import Backend
from engine.core.request import ScheduledBatch
from engine.model.config import ModelConfig
from engine.sampler import sample
from engine.sampling_params import MAX_LOGPROBS


def wants_prompt_logprobs(batch: ScheduledBatch) -> bool:
    """Whether a row of `batch` computes prompt positions whose logprobs were asked for."""
    return any(sq.request.params.prompt_logprobs is not None
               and sq.start_pos + len(sq.token_ids) > sq.request.params.prompt_logprobs_start
               and sq.start_pos < sq.request.num_prompt_tokens - 1 for sq in batch.seqs)


def make_prompt_step(cfg: ModelConfig, backend: Backend, fwd: Any, replicated: Any) -> Any:
    """The jitted step of a batch with prompt-logprob rows (KV cache donated): sample output,
    KV cache, and (logprob of each position's target [T], top ids [T, K], top logprobs)."""

    def step(params, kv, tokens, md, all_idx, targets, logits_idx, st, bitmask, mode, k):
        logits, kv = fwd(params, kv, tokens, md, all_idx)  # [T, V] f32
        lp = jax.nn.log_softmax(logits, axis=-1)  # [T, V]
        chosen = jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]  # [T]
        if k:
            top_lp, top_ids = jax.lax.top_k(lp, k)  # [T, K]
        else:
            top_lp, top_ids = jnp.zeros((lp.shape[0], 0)), jnp.zeros((lp.shape[0], 0), jnp.int32)
        out = sample(logits[logits_idx], st, mode, bitmask)  # logits [S, V]
        return replicated(out), kv, replicated((chosen, top_ids.astype(jnp.int32), top_lp))

    return backend.jit(step, static_argnames=("mode", "k"), donate_argnums=(1,))


@dataclasses.dataclass
class PromptInputs:
    all_idx: np.ndarray
    """int32 [T]: every token's index (the forward's logits rows)."""
    targets: np.ndarray
    """int32 [T]: the token that follows each position (0 where none is wanted)."""
    k: int
    """Top logprobs per position, rounded up to 0, 5 or MAX_LOGPROBS (few programs)."""


def prompt_inputs(batch: ScheduledBatch, t: int) -> PromptInputs:
    targets = np.zeros(t, np.int32)
    off, need = 0, 0
    for sq in batch.seqs:
        n, r = len(sq.token_ids), sq.request
        if r.params.prompt_logprobs is not None:
            need = max(need, r.params.prompt_logprobs)
            # Row off + j is position start + j; it scores the prompt token at start + j + 1.
            nxt = r.prompt_token_ids[sq.start_pos + 1: sq.start_pos + n + 1]
            targets[off:off + len(nxt)] = nxt
        off += n
    k = next(b for b in (0, 5, MAX_LOGPROBS) if b >= need)
    return PromptInputs(np.arange(t, dtype=np.int32), targets, k)


def record(batch: ScheduledBatch, chosen: np.ndarray, top_ids: np.ndarray,
           top_lp: np.ndarray) -> None:
    """Store each wanted prompt token's {token: logprob, top k...} in its request, by
    position (a recomputation after preemption writes the same values again)."""
    off = 0
    for sq in batch.seqs:
        n, r = len(sq.token_ids), sq.request
        p = r.params
        if p.prompt_logprobs is not None:
            k = p.prompt_logprobs
            for j in range(n):
                pos = sq.start_pos + j + 1  # the prompt position scored by row off + j
                if p.prompt_logprobs_start <= pos < r.num_prompt_tokens:
                    lp = {int(a): float(b) for a, b in zip(top_ids[off + j, :k],
                                                           top_lp[off + j, :k], strict=True)}
                    lp[r.prompt_token_ids[pos]] = float(chosen[off + j])
                    r.prompt_logprobs[pos] = lp
        off += n
