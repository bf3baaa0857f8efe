"""Where a CPU decode step's time goes: the whole Engine.step against its parts.

Usage: python scripts/profile_cpu_step.py [--batch 1 8] [--input-len 64] [--dtype float32]
       [--quantization gguf] [--attention reference]

For each batch size it prefills `batch` prompts, runs a few decode steps, then times (median
of --iters runs, each blocked on its outputs):
  engine.step  the whole step: schedule, prepare, dispatch, step program, read tokens
  prepare      host-side batch arrays (ModelRunner.prepare)
  step         the jitted forward + sample on the prepared arrays
  forward      the forward alone;  - attention: the forward with the backend's attention
               replaced by a pass-through, so the difference is the attention's cost
  sample       the sampler alone on [S, V] logits of the step's mode
and a 64-token prefill chunk's forward. Prints the load average before and after: figures
taken while other work shares the cores are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import numpy as np

from engine.llm import LLM
from engine.model.llama import forward
from engine.runner import make_step
from engine.sampler import sample
from engine.sampling_params import SamplingParams

CPU_MS: dict[str, float] = {}
"""Per label, the process CPU time of the fastest run (all threads): on a shared host less
disturbed than the wall time, though XLA's spinning worker threads add to it."""


def _median_ms(fn, iters: int, label: str = "") -> float:
    """The fastest of `iters` runs (wall ms): on a shared host the least disturbed one."""
    jax.block_until_ready(fn())  # compile
    best = (float("inf"), 0.0)
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    if label:
        CPU_MS[label] = best[1] * 1e3
    return best[0] * 1e3


def profile(llm: LLM, batch: int, input_len: int, iters: int,
            only_step: bool = False) -> dict[str, float]:
    eng = llm.engine
    runner, cfg = eng.runner, llm.model_config
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(rng.integers(10, cfg.vocab_size // 2, size=input_len).tolist(), sp)
           for _ in range(batch)]
    pending = set(ids)
    while pending:  # until every request has its first token
        pending -= {o.request_id for o in eng.step()}
    for _ in range(3):
        eng.step()
    out: dict[str, float] = {}
    best = (float("inf"), 0.0)
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        eng.step()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    out["engine.step"] = best[0] * 1e3
    CPU_MS["engine.step"] = best[1] * 1e3

    b = eng.scheduler.schedule()  # one more decode batch, prepared but run by hand below
    t0 = time.perf_counter()
    for _ in range(iters):
        tokens, md, logits_idx, st, mode = runner.prepare(b)
    out["prepare"] = (time.perf_counter() - t0) / iters * 1e3
    src = np.full(tokens.shape, -1, np.int32)
    params, be = runner.params, runner.backend
    kv = jax.tree.map(lambda x: x.copy(), runner.kv)  # donated below: keep the engine's own

    step = make_step(cfg, be, runner.buckets.seqs[-1])

    def run_step():
        nonlocal kv
        o, kv, nxt = step(params, kv, tokens, md, logits_idx, st, runner._no_prev, src, mode)
        return o
    out["step"] = _median_ms(run_step, iters, "step")
    if only_step:
        return out

    def fwd_with(attend=None, write=None):
        a = attend or functools.partial(be.attention_fn(), scale=cfg.head_dim**-0.5)
        f = jax.jit(functools.partial(forward, cfg=cfg, attend=a, write=write or be.write_kv),
                    donate_argnums=(1,))  # else each call copies the whole KV cache

        def run():
            nonlocal kv
            logits, kv = f(params, kv, tokens, md, logits_idx)
            return logits
        return run
    full = _median_ms(fwd_with(), iters, "forward")
    out["forward"] = full
    out["- attention"] = full - _median_ms(fwd_with(attend=lambda q, k, v, md, layer=None: q),
                                           iters, "no attention")
    # (without the KV write the forward returns the donated cache unchanged, which XLA copies:
    # that ablation measures the copy, not the write, so it is left out)
    logits = fwd_with()()
    smp = jax.jit(sample, static_argnames=("mode",))
    out["sample"] = _median_ms(lambda: smp(logits, st, mode), iters, "sample")
    out["shape T,S,P"] = float(tokens.shape[0] * 10000 + md.seq_lens.shape[0] * 100
                               + md.page_table.shape[1])
    for i in ids:
        eng.abort(i)
    eng.step()
    return out


def prefill_ms(llm: LLM, n: int, iters: int) -> float:
    """The forward of one n-token prompt chunk (no cached prefix)."""
    from engine.attention import AttentionMetadata

    runner, cfg = llm.engine.runner, llm.model_config
    ps = runner.page_size
    pt = np.arange(1, 1 + max(4, -(-n // ps)), dtype=np.int32)[None]  # [1, P]
    md = AttentionMetadata.one_sequence(0, n, pt, ps, runner.num_pages)
    tokens = np.arange(10, 10 + md.positions.shape[0], dtype=np.int32)
    attend = functools.partial(runner.backend.attention_fn(), scale=cfg.head_dim**-0.5)
    f = jax.jit(functools.partial(forward, cfg=cfg, attend=attend, write=runner.backend.write_kv),
                donate_argnums=(1,))
    kv = runner.kv
    idx = np.array([n - 1] * 4, np.int32)

    def run():
        nonlocal kv
        logits, kv = f(runner.params, kv, tokens, md, idx)
        return logits
    return _median_ms(run, iters, "prefill")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default=None, help="e.g. gguf, int8 (default: the preset's)")
    ap.add_argument("--only-step", action="store_true",
                    help="time engine.step and the jitted step only (quick: e.g. XLA_FLAGS)")
    ap.add_argument("--min-bucket", type=int, nargs=2, default=None, metavar=("TOKENS", "SEQS"),
                    help="override the CPU backend's smallest token and sequence buckets")
    ap.add_argument("--attention", choices=("kernel", "reference"), default="kernel",
                    help="the CPU backend's attention: the C++ kernel or the plain-JAX oracle")
    args = ap.parse_args()
    if args.min_bucket:
        from backends.cpu.backend import CpuBackend

        CpuBackend.capabilities = dataclasses.replace(
            CpuBackend.capabilities, min_token_bucket=args.min_bucket[0],
            min_seq_bucket=args.min_bucket[1])
    print(f"load average before: {os.getloadavg()}")
    quant = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, backend="cpu", dtype=args.dtype, max_total_tokens=8192,
              options=(("attention", args.attention),), **quant)
    for b in args.batch:
        CPU_MS.clear()
        r = profile(llm, b, args.input_len, args.iters, args.only_step)
        print(f"batch {b}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
        print("  cpu ms: " + ", ".join(f"{k} {v:.1f}" for k, v in CPU_MS.items()), flush=True)
    if not args.only_step:
        ms = prefill_ms(llm, args.input_len, args.iters)
        print(f"prefill {args.input_len} tokens: {ms:.1f} ms, cpu {CPU_MS['prefill']:.1f} ms")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
