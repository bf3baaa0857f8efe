"""What the hardware allows: the bytes a step must read and the FLOPs it must do, against
the copy bandwidth and the matmul rate of the same device, measured in the same run.

A step's bound is max(bytes / bandwidth, FLOPs / matmul rate):
- bytes: every weight once (an untied embedding table only for the rows the step gathers)
  plus the K/V of every sequence's context (each attention reads it once);
- FLOPs: 2 per weight and token for the layers' matmuls (of a mixture of experts, the K
  routed experts' weights only), 2 per LM-head weight and logit row, and 4 x head dim per
  causal query-key pair and query head (QK^T and PV).
With N devices the bound is 1/N of that: each device reads and computes its share.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from engine.model.config import ModelConfig
from engine.model.weights import tree_bytes


def _timed(f, x, reps: int) -> float:
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    jax.block_until_ready(y)
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written
    (1 GiB on an accelerator, 64 MiB on the CPU)."""
    nbytes = nbytes or (1 << 26 if jax.default_backend() == "cpu" else 1 << 30)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * nbytes / _timed(jax.jit(lambda a: a * 1.0000001), x, reps)


def matmul_rate(n: int | None = None, reps: int = 10) -> float:
    """bf16 n x n x n matmul FLOP/s (n = 8192 on an accelerator, 512 on the CPU)."""
    n = n or (512 if jax.default_backend() == "cpu" else 8192)
    x = jnp.ones((n, n), jnp.bfloat16)
    return 2 * n**3 / _timed(jax.jit(lambda a: a @ a), x, reps)


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-token costs of one model: bytes and FLOPs by the rules in the module doc."""

    weight_bytes: int
    """Every weight but an untied embedding table."""
    embed_row_bytes: int
    """Bytes of one embedding row, gathered per token when the table is untied (else 0)."""
    layer_params: int
    """Layer weights one token multiplies (of the experts, K of X)."""
    head_params: int
    kv_bytes_per_token: int
    attention_flops_per_pair: int

    @classmethod
    def of(cls, cfg: ModelConfig, params, kv_itemsize: int) -> ModelCost:
        embed = params["embed"]
        untied = not cfg.tie_word_embeddings
        layers = params["layers"]
        experts = sum(lp[n].size for lp in (layers if isinstance(layers, list) else [layers])
                      for n in ("expert_gate", "expert_up", "expert_down") if n in lp)
        active = experts * cfg.num_experts_per_tok // cfg.num_experts if experts else 0
        return cls(
            weight_bytes=tree_bytes(params) - (embed.size * embed.dtype.itemsize if untied else 0),
            embed_row_bytes=embed.shape[1] * embed.dtype.itemsize if untied else 0,
            layer_params=sum(x.size for x in jax.tree.leaves(layers)) - experts + active,
            head_params=cfg.hidden_size * cfg.vocab_size,
            kv_bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_itemsize,
            attention_flops_per_pair=4 * cfg.num_layers * cfg.num_heads * cfg.head_dim)

    def step_bytes(self, tokens: int, context_tokens: int) -> int:
        return (self.weight_bytes + tokens * self.embed_row_bytes
                + context_tokens * self.kv_bytes_per_token)

    def step_flops(self, tokens: int, logit_rows: int, attention_pairs: int) -> int:
        return (2 * self.layer_params * tokens + 2 * self.head_params * logit_rows
                + self.attention_flops_per_pair * attention_pairs)

    def step_bound(self, work: StepWork, bandwidth: float, flop_rate: float,
                   devices: int = 1) -> float:
        """Seconds the step takes at best: the slower of its reads and its matmuls."""
        mem = self.step_bytes(work.tokens, work.context_tokens) / bandwidth
        compute = self.step_flops(work.tokens, work.logit_rows, work.attention_pairs) / flop_rate
        return max(mem, compute) / devices


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one step computed (real rows only, no padding) and how long it took."""

    decode_only: bool
    tokens: int
    logit_rows: int
    context_tokens: int
    """Sum over the step's sequences of their K/V length after the step."""
    attention_pairs: int
    """Causal (query, key) pairs over the step's tokens."""
    seconds: float
    """As ModelRunner.step_log counts them."""
