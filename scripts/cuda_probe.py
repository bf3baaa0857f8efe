"""On a GPU: where the Llama-3.1-8B-shape decode step's time goes, and a block-size sweep of
the Pallas decode kernel. Usage: PYTHONPATH=. python3 scripts/cuda_probe.py OUTDIR [parts]

parts (default all): steps (engine step with overlap on/off vs the device step alone, and a
profile of the device step summed per kernel), sweep (decode kernel block sizes), decode
(JAX's decode kernel vs ours, kernels/gqa_decode.py, and variants of ours, at the shapes
"BATCH:CTX ..." of $PROBE_DECODE; writes decode_choice.txt: the faster at the last shape).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention


def timed(f, *args, reps: int = 30) -> float:
    """Mean seconds per call of f(*args) after warm-up (dispatch is asynchronous)."""
    for _ in range(3):
        out = f(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def kernel_table(trace_dir: str, steps: int, top: int = 20) -> str:
    """GPU kernel time per step, summed by kernel name, from the profiler's perfetto trace."""
    files = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not files:
        return f"no perfetto trace under {trace_dir}"
    with gzip.open(files[0]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pname = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in pname.items() if "GPU" in n or "gpu" in n}
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    spans = []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            total[e["name"][:90]] += e["dur"]
            count[e["name"][:90]] += 1
            spans.append((e["ts"], e["ts"] + e["dur"]))
    if not spans:
        return "no GPU events; processes: " + ", ".join(sorted(set(pname.values())))
    busy = sum(total.values())
    wall = max(b for _, b in spans) - min(a for a, _ in spans)
    lines = [f"GPU kernels: {sum(count.values()) / steps:.0f}/step, busy {busy / steps / 1e3:.3f} "
             f"ms/step, first-to-last {wall / steps / 1e3:.3f} ms/step"]
    for name, us in total.most_common(top):
        lines.append(f"  {us / steps / 1e3:8.3f} ms {count[name] // steps:5d}x  {name}")
    return "\n".join(lines)


def steps(out: str) -> None:
    import os

    from engine.bench.latency import measure
    from engine.bench.roofline import copy_bandwidth
    from engine.llm import LLM

    pool = int(os.environ.get("PROBE_POOL", "300000")) or None  # 0: sized from free memory
    llm = LLM(os.environ.get("PROBE_MODEL", "llama-3.1-8b"),
              backend=os.environ.get("PROBE_BACKEND", "cuda"), load_format="dummy",
              max_total_tokens=pool, overlap_schedule=True)
    eng, runner = llm.engine, llm.engine.runner
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, KV pool {eng.scheduler.pool.num_pages} pages",
          flush=True)
    recorded = {}
    step_fn = runner._step

    def recording(*a, **k):
        recorded["args"], recorded["kw"] = a, k
        return step_fn(*a, **k)

    runner._step = recording
    print(f"{'batch':>5} {'overlap ms':>10} {'sync ms':>8} {'device ms':>9} {'roofline':>8}")
    for b in [int(x) for x in os.environ.get("PROBE_BATCHES", "1 32 128 256").split()]:
        row = []
        for overlap in (True, False):
            while eng._inflight is not None:
                eng.step()
            eng.overlap = overlap
            r = measure(llm, b, 1024, 24)
            row.append(r["decode_step_s"])
        a, k = recorded["args"], recorded["kw"]

        def device_step(kv, a=a, k=k):
            out, kv, nt = step_fn(a[0], kv, *a[2:], **k)
            return kv, nt

        runner._step = step_fn
        kv = runner.kv
        for _ in range(3):
            kv, nt = device_step(kv)
        jax.block_until_ready(nt)
        t0 = time.perf_counter()
        n = 20
        for _ in range(n):
            kv, nt = device_step(kv)
        jax.block_until_ready(nt)
        dev = (time.perf_counter() - t0) / n
        if b in (1, 128):
            tdir = f"/tmp/engine-trace/b{b}"
            with jax.profiler.trace(tdir, create_perfetto_trace=True):
                for _ in range(5):
                    kv, nt = device_step(kv)
                jax.block_until_ready(nt)
        runner.kv = kv
        runner._step = recording
        roof = (r["weight_bytes"] + r["kv_bytes_read"]) / bw
        print(f"{b:>5} {row[0] * 1e3:>10.2f} {row[1] * 1e3:>8.2f} {dev * 1e3:>9.2f} "
              f"{roof * 1e3:>8.2f}", flush=True)
        if b in (1, 128):
            print(kernel_table(f"/tmp/engine-trace/b{b}", 5,
                               int(os.environ.get("PROBE_TOP", "20"))), flush=True)
    eng.overlap = True


def sweep(out: str) -> None:
    hkv, g, d, page = 8, 4, 128, 16
    rng = np.random.default_rng(0)
    results = []
    for b, ctx in ((1, 1024), (8, 1024), (32, 1024), (128, 1024), (256, 1024), (256, 2048),
                   (1, 8192)):
        pages = b * ctx // page
        p = ctx // page  # the table width the runner's bucket gives for this context
        k = jnp.asarray(rng.standard_normal((hkv, pages, page, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((hkv, pages, page, d)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((b, hkv * g, d)) * d**-0.5, jnp.bfloat16)
        table = jnp.asarray(rng.permutation(pages).reshape(b, p), jnp.int32)
        lens = jnp.full((b,), ctx, jnp.int32)
        nbytes = 2 * b * ctx * hkv * d * 2
        ref = None
        best = []
        for ks, ppcb in itertools.product((1, 2, 4, 8, 16), (4, 8, 16, 32)):
            if p % ks or (p // ks) % ppcb:
                continue
            for warps, stages in ((4, 2),):
                f = jax.jit(lambda q, k, v, t, n, ks=ks, ppcb=ppcb, w=warps, s=stages:
                            paged_attention(q, k, v, t, n, block_h=16, pages_per_compute_block=ppcb,
                                            k_splits=ks, num_warps=w, num_stages=s))
                try:
                    o = f(q, k, v, table, lens)
                    if ref is None:
                        ref = o.astype(jnp.float32)
                    err = float(jnp.linalg.norm(o.astype(jnp.float32) - ref) /
                                jnp.linalg.norm(ref))
                    t = timed(f, q, k, v, table, lens)
                except Exception as e:  # noqa: BLE001 - a variant Triton cannot build
                    print(f"b{b} ctx{ctx} ks{ks} ppcb{ppcb}: {type(e).__name__}", flush=True)
                    continue
                best.append((t, ks, ppcb, warps, stages, err))
        best.sort()
        t0, ks, ppcb, _, _, _ = best[0]
        for warps, stages in ((8, 2), (4, 3), (8, 3), (4, 1)):
            f = jax.jit(lambda q, k, v, t, n, w=warps, s=stages, ks=ks, ppcb=ppcb:
                        paged_attention(q, k, v, t, n, block_h=16, pages_per_compute_block=ppcb,
                                        k_splits=ks, num_warps=w, num_stages=s))
            try:
                t = timed(f, q, k, v, table, lens)
            except Exception as e:  # noqa: BLE001
                print(f"b{b} ctx{ctx} warps{warps} stages{stages}: {type(e).__name__}")
                continue
            best.append((t, ks, ppcb, warps, stages, 0.0))
        best.sort()
        for t, ks, ppcb, warps, stages, err in best[:6]:
            results.append(dict(batch=b, ctx=ctx, k_splits=ks, ppcb=ppcb, warps=warps,
                                stages=stages, ms=t * 1e3, tbs=nbytes / t / 1e12, err=err))
            print(f"b{b:>4} ctx{ctx:>5} ks{ks:>3} ppcb{ppcb:>3} w{warps} s{stages}: "
                  f"{t * 1e3:7.3f} ms {nbytes / t / 1e12:5.2f} TB/s err {err:.1e}", flush=True)
        cur = [r for r in best if r[1] == 16 or r[1] == max(x[1] for x in best)]
        print(f"  (largest k_splits tried: {min(cur)[0] * 1e3:.3f} ms)", flush=True)
        del k, v
    with open(f"{out}/decode_sweep.json", "w") as f:
        json.dump(results, f, indent=1)


def decode(out: str) -> None:
    import os

    from backends.gpu.kernels.gqa_decode import gqa_decode_attention
    from backends.gpu.kernels.paged_decode import decode_attention, partition

    hkv, g, d, page = 8, 4, 128, 16
    rng = np.random.default_rng(0)
    results, faster = [], "jax"
    shapes = os.environ.get("PROBE_DECODE", "1:1024 32:1024 128:1024 256:1024 256:1536")
    for shape in shapes.split():
        b, ctx = (int(x) for x in shape.split(":"))
        p = 1 << (-(-ctx // page) - 1).bit_length()  # the runner's page bucket
        pages = b * p
        k = jnp.asarray(rng.standard_normal((hkv, pages, page, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((hkv, pages, page, d)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
        table = jnp.asarray(rng.permutation(pages).reshape(b, p), jnp.int32)
        lens = jnp.full((b,), ctx, jnp.int32)
        nbytes = 2 * b * ctx * hkv * d * 2
        ks, ppb = partition(hkv, b, p, page)
        interp = jax.default_backend() != "gpu"  # a smoke test on a host without a GPU
        variants = {"jax": jax.jit(functools.partial(decode_attention, scale=d**-0.5,
                                                     interpret=interp)),
                    "gqa": jax.jit(functools.partial(decode_attention, scale=d**-0.5,
                                                     impl="gqa", interpret=interp))}
        for kk, pp, w, st in ((ks, ppb, 8, 1), (ks, ppb, 4, 2), (ks, ppb, 4, 3),
                              (ks, max(1, ppb // 2), 4, 1), (ks, ppb * 2, 4, 1),
                              (ks * 2, ppb, 4, 1), (max(1, ks // 2), ppb, 4, 1)):
            if p % kk or (p // kk) % pp or pp * page < 16 or (kk, pp, w, st) == (ks, ppb, 4, 1):
                continue
            variants[f"gqa ks{kk} bk{pp * page} w{w} s{st}"] = jax.jit(functools.partial(
                gqa_decode_attention, scale=d**-0.5, k_splits=kk, pages_per_block=pp,
                num_warps=w, num_stages=st, interpret=interp))
        ref, times = None, {}
        for name, f in variants.items():
            try:
                o = f(q, k, v, table, lens).astype(jnp.float32)
                ref = o if ref is None else ref
                err = float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))
                t = timed(f, q, k, v, table, lens)
            except Exception as e:  # noqa: BLE001 - a variant Triton cannot build
                print(f"b{b} ctx{ctx} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            times[name] = t
            results.append(dict(batch=b, ctx=ctx, kernel=name, ms=t * 1e3,
                                tbs=nbytes / t / 1e12, err=err))
            print(f"b{b:>4} ctx{ctx:>5} {name:<26} {t * 1e3:7.3f} ms "
                  f"{nbytes / t / 1e12:5.2f} TB/s err {err:.1e}  (rule: ks{ks} bk{ppb * page})",
                  flush=True)
        if "gqa" in times and "jax" in times:
            faster = "gqa" if times["gqa"] < times["jax"] else "jax"
        del k, v
    with open(f"{out}/decode_probe.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{out}/decode_choice.txt", "w") as f:
        f.write(faster + "\n")
    print(f"faster at the last shape: {faster}", flush=True)


if __name__ == "__main__":
    out = sys.argv[1]
    parts = sys.argv[2:] or ["sweep", "steps"]
    for part in parts:
        print(f"== {part}", flush=True)
        {"steps": steps, "sweep": sweep, "decode": decode}[part](out)
