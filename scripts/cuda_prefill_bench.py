"""On a GPU: the ragged paged-attention (prefill) kernel against the plain-JAX oracle and
cuDNN flash attention, Llama-3.1-8B attention shape (32 q / 8 kv heads, D 128, page 16, bf16).

Cases: one 8k-token causal prompt, 8 x 1024 and 32 x 1024 prompts (fresh: no cached prefix).
For each: median ms and TFLOP/s of (a) our kernel, (b) the oracle (backends/cpu/attention.py,
skipped where too slow), (c) jax.nn.dot_product_attention(implementation="cudnn") on the
same tokens in a dense [B, L, H, D] causal layout; and the max abs error of ours against the
oracle and cuDNN. Then a small block-size sweep for the 8k case (prints the best), a bf16
matmul for scale, and a table. Causal FLOPs: 4 * Hq * D * sum(q_len * (q_len + 1) / 2).
Results go to $OUT/cuda_prefill_bench.json when OUT is set.
Usage: PYTHONPATH=. python3 scripts/cuda_prefill_bench.py [--no-sweep]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from backends.cpu.attention import ragged_paged_attention as oracle
from backends.gpu.kernels.ragged_prefill import BLOCK_SIZES, BlockSizes, ragged_paged_attention
from engine.attention import AttentionMetadata

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
CASES = {"8k x1": [8192], "1k x8": [1024] * 8, "1k x32": [1024] * 32}
ORACLE_MAX_TOKENS = 32768
"""The oracle gathers each token chunk's whole K/V: fine at these sizes, skipped past them."""
SWEEP = [BlockSizes(bq, bk, w, st) for bq, bk, w, st in
         itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
SWEEP_BUDGET_S = 120.0


def make_batch(q_lens: list[int], seed: int = 0):
    """Fresh prompts packed back to back, pages shuffled; also the dense [B, L, H, D] views
    (all q_lens equal) for cuDNN."""
    rng = np.random.default_rng(seed)
    n = sum(q_lens)
    pages_per = [-(-q // PAGE) for q in q_lens]
    num_pages = sum(pages_per)
    perm = rng.permutation(num_pages).astype(np.int32)
    page_table = np.zeros((len(q_lens), max(pages_per)), np.int32)
    positions = np.zeros(n, np.int32)
    token_seq = np.zeros(n, np.int32)
    query_start = np.zeros(len(q_lens) + 1, np.int32)
    off = nxt = 0
    for s, q in enumerate(q_lens):
        page_table[s, :pages_per[s]] = perm[nxt:nxt + pages_per[s]]
        nxt += pages_per[s]
        query_start[s] = off
        positions[off:off + q] = np.arange(q)
        token_seq[off:off + q] = s
        off += q
    query_start[-1] = n
    slots = page_table[token_seq, positions // PAGE] * PAGE + positions % PAGE
    md = AttentionMetadata(positions=positions, slot_mapping=slots, token_seq=token_seq,
                           query_start=query_start, seq_lens=np.asarray(q_lens, np.int32),
                           page_table=page_table, num_tokens=np.int32(n), page_size=PAGE)
    md = jax.tree.map(jnp.asarray, md)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (n, HQ, D), DTYPE)  # q: [T, Hq, D]
    k_tok = jax.random.normal(kk, (n, HKV, D), DTYPE)  # this step's K/V: [T, Hkv, D]
    v_tok = jax.random.normal(kv, (n, HKV, D), DTYPE)
    cache = jnp.zeros((HKV, num_pages, PAGE, D), DTYPE)  # [Hkv, pages, page, D]
    idx = (slice(None), slots // PAGE, slots % PAGE)
    k_cache = cache.at[idx].set(k_tok.swapaxes(0, 1))
    v_cache = cache.at[idx].set(v_tok.swapaxes(0, 1))
    b, length = len(q_lens), q_lens[0]
    dense = None
    if all(x == length for x in q_lens):
        dense = tuple(x.reshape(b, length, x.shape[1], D) for x in (q, k_tok, v_tok))
    return q, k_cache, v_cache, md, dense


def causal_flops(q_lens: list[int]) -> float:
    return 4.0 * HQ * D * sum(q * (q + 1) / 2 for q in q_lens)


def timeit(fn: Callable[[], jax.Array], reps: int = 10, warmup: int = 2,
           max_s: float = 20.0) -> tuple[float, jax.Array]:
    """Median wall ms over `reps` runs (fewer if a run is slow) after warm-up."""
    out = None
    for _ in range(warmup):
        out = fn().block_until_ready()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        out = fn().block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def max_abs(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def bench_case(name: str, q_lens: list[int], scale: float) -> dict:
    q, k_cache, v_cache, md, dense = make_batch(q_lens)
    flops = causal_flops(q_lens)
    row: dict = {"case": name, "tokens": sum(q_lens), "seqs": len(q_lens), "gflop": flops / 1e9}
    ours_fn = jax.jit(lambda q, k, v, md: ragged_paged_attention(q, k, v, md, scale=scale))
    ms, ours = timeit(lambda: ours_fn(q, k_cache, v_cache, md))
    row.update(ours_ms=ms, ours_tflops=flops / ms / 1e9)
    print(f"{name}: ours {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    if sum(q_lens) <= ORACLE_MAX_TOKENS:
        ref_fn = jax.jit(lambda q, k, v, md: oracle(q, k, v, md, scale=scale, head_major=True))
        ms, ref = timeit(lambda: ref_fn(q, k_cache, v_cache, md), reps=3, warmup=1)
        row.update(oracle_ms=ms, oracle_tflops=flops / ms / 1e9, err_vs_oracle=max_abs(ours, ref))
        print(f"{name}: oracle {ms:.3f} ms, max |ours - oracle| {row['err_vs_oracle']:.3e}",
              flush=True)
    if dense is not None:
        dq, dk, dv = dense
        try:
            cudnn_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, implementation="cudnn"))
            ms, ref = timeit(lambda: cudnn_fn(dq, dk, dv))
            err = max_abs(ours, ref.reshape(ours.shape))
            row.update(cudnn_ms=ms, cudnn_tflops=flops / ms / 1e9, err_vs_cudnn=err)
            print(f"{name}: cudnn {ms:.3f} ms, max |ours - cudnn| {err:.3e}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on: cuDNN is only the yardstick
            row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{name}: cudnn failed: {row['cudnn_error']}", flush=True)
    return row


def sweep(q_lens: list[int], scale: float) -> list[dict]:
    q, k_cache, v_cache, md, _ = make_batch(q_lens)
    flops = causal_flops(q_lens)
    rows, start = [], time.perf_counter()
    for sizes in SWEEP:
        if time.perf_counter() - start > SWEEP_BUDGET_S:
            print("sweep: time budget spent, stopping", flush=True)
            break
        fn = jax.jit(lambda q, k, v, md, sizes=sizes: ragged_paged_attention(
            q, k, v, md, scale=scale, sizes=sizes))
        try:
            ms, _ = timeit(lambda fn=fn: fn(q, k_cache, v_cache, md), reps=5, warmup=1)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            print(f"sweep {sizes}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
            rows.append({**dataclasses.asdict(sizes), "error": type(e).__name__})
            continue
        rows.append({**dataclasses.asdict(sizes), "ms": ms, "tflops": flops / ms / 1e9})
        print(f"sweep {sizes}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    return rows


def matmul_tflops(n: int = 8192) -> float:
    a = jax.random.normal(jax.random.key(1), (n, n), DTYPE)
    f = jax.jit(lambda a: a @ a)
    ms, _ = timeit(lambda: f(a))
    return 2 * n**3 / ms / 1e9


def main() -> None:
    print(jax.devices(), "jax", jax.__version__, "default", BLOCK_SIZES, flush=True)
    scale = D**-0.5
    result: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                    "default_sizes": dataclasses.asdict(BLOCK_SIZES)}
    result["matmul_bf16_tflops"] = matmul_tflops()
    print(f"bf16 matmul 8192^3: {result['matmul_bf16_tflops']:.1f} TFLOP/s", flush=True)
    result["cases"] = [bench_case(name, q_lens, scale) for name, q_lens in CASES.items()]
    if "--no-sweep" not in sys.argv:
        result["sweep_8k"] = rows = sweep(CASES["8k x1"], scale)
        ok = [r for r in rows if "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            result["sweep_best"] = best
            print(f"sweep best: {best}", flush=True)
    if out := os.environ.get("OUT"):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cuda_prefill_bench.json"), "w") as f:
            json.dump(result, f, indent=1)
    mm = result["matmul_bf16_tflops"]
    print(f"\n{'case':8} {'ours ms':>8} {'TFLOP/s':>8} {'% mm':>5} {'oracle ms':>10} "
          f"{'cudnn ms':>9} {'cudnn TF/s':>10} {'err/oracle':>10} {'err/cudnn':>10}")
    for r in result["cases"]:
        def f(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['case']:8} {r['ours_ms']:8.3f} {r['ours_tflops']:8.1f} "
              f"{100 * r['ours_tflops'] / mm:5.1f} {f('oracle_ms', '10.2f'):>10} "
              f"{f('cudnn_ms', '9.3f'):>9} {f('cudnn_tflops', '10.1f'):>10} "
              f"{f('err_vs_oracle', '10.2e'):>10} {f('err_vs_cudnn', '10.2e'):>10}")


if __name__ == "__main__":
    main()
