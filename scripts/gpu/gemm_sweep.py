"""On a GPU: the quantized GEMMs of the Llama-3.1-8B shapes at decode-sized M, timed so that
small M is not launch-bound, and a sweep of the kernels' launch parameters.

One timed program runs L GEMMs back to back on L distinct weights (as a decode step runs its
layers; together well past the 50 MB L2) with L distinct activations, inside one jitted
call dispatched several times in a row; the time per GEMM is the program's over L. Weights
are random payloads in each format's layout (the kernels' speed does not depend on values).

Order (the sweep stops at its time budget and says what it skipped), for M = 16, 1, 8, 32,
64 in turn (16 first: a batch-1 decode step's rows): every shape in bf16 (XLA's dot on
[K, N], the model's) and fp8 W8A8 through XLA's FP8 dot; at M = 16 also each scheme's path
as the backend takes it (quant_linear with the current tuning); then the kernels' candidates
(quant_linear.prior_sizes first) for int4, fp8 weight-only, W8A8 (ours) and int8 on every
shape; weight GB/s for each. At the end the winners as quant_tuning.TUNED lines (only where
a candidate beat the prior by 3%) and which fp8 path is faster per M
(quant_tuning.FP8_WEIGHT_ONLY_MAX_M).

Writes OUT/gemm_sweep.json (every row) and OUT/quant_tuning_paste.txt (the lines to paste).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from backends.gpu.kernels import quant_linear as ql
from backends.gpu.kernels import quant_tuning
from engine.model.quant import QuantizedWeight, fp8_rows

SHAPES = {"wqkv": (4096, 6144), "wo": (4096, 4096), "gate/up": (4096, 14336),
          "down": (14336, 4096), "lm_head": (4096, 128256)}
"""Name -> (K, N) of the 8B model's GEMMs (gate and up are two GEMMs of the same shape).
The head stays int8 under int4 (engine.loader.quantize), so int4 skips it."""
MS = (16, *(m for m in quant_tuning.M_BUCKETS if m != 16))
"""M = 16 first: a batch-1 decode step's rows (the engine's smallest token bucket), what the
sweep must reach inside its budget."""
PROGRAM_BYTES = 256 << 20
"""Weight bytes one timed program reads at least (L = this / one weight's, 2..16)."""
GS = ql.GemmSizes
INTERPRET = jax.default_backend() != "gpu"
"""Off a GPU the kernels run in the Pallas interpreter (a smoke run at small SHAPES)."""


def make_weight(scheme: str, k: int, n: int, key: jax.Array):
    """Random payload in `scheme`'s layout: bf16 [K, N] (the model's dot), or a
    QuantizedWeight [N, K] (int4 in groups of 128)."""
    k1, k2, k3 = jax.random.split(key, 3)
    if scheme == "bf16":
        return (jax.random.normal(k1, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    if scheme == "int4":
        data = jax.random.bits(k1, (n, k // 2), jnp.uint8)
        scales = jax.random.uniform(k2, (n, k // 128), jnp.float32, 1e-3, 1e-2)
        zeros = jnp.round(jax.random.uniform(k3, (n, k // 128), jnp.float32, 0, 15))
        return QuantizedWeight(data, scales, "int4", (k,), (n,), zeros)
    scales = jax.random.uniform(k2, (n,), jnp.float32, 1e-4, 1e-3)
    if scheme == "int8":
        data = jax.random.randint(k1, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
        return QuantizedWeight(data, scales, "int8", (k,), (n,))
    data = (jax.random.normal(k1, (n, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
    return QuantizedWeight(data, scales, "fp8", (k,), (n,))


def weight_bytes(w) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))


def gemm_fn(scheme: str, sizes: GS | None, path: str):
    """(x [M, K], w) -> [M, N]: path 'model' (bf16's dot or quant_linear as the backend
    calls it), 'kernel' (the scheme's kernel at `sizes`), 'xla' (W8A8 through XLA's dot)."""
    if scheme == "bf16":
        return lambda x, w: x @ w
    if path == "model":
        return lambda x, w: ql.quant_linear(x, w, interpret=INTERPRET)
    if path == "xla":
        return lambda x, w: ql.w8a8_xla(*fp8_rows(x), w.data, w.scales, out_dtype=x.dtype)
    if scheme == "w8a8":
        return lambda x, w: ql.w8a8_pallas(*fp8_rows(x), w.data, w.scales, out_dtype=x.dtype,
                                           sizes=sizes, interpret=INTERPRET)
    return lambda x, w: ql.woq_pallas(x, w, sizes=sizes, interpret=INTERPRET)


def per_gemm_s(fn, ws: list, xs: list) -> float:
    """Seconds per GEMM: one jitted program of len(ws) GEMMs, dispatched back to back."""
    prog = jax.jit(lambda ws, xs: [fn(x, w) for x, w in zip(xs, ws, strict=True)])
    jax.block_until_ready(prog(ws, xs))  # compile, warm
    t0 = time.perf_counter()
    jax.block_until_ready(prog(ws, xs))
    reps = int(np.clip(0.05 / max(time.perf_counter() - t0, 1e-6), 3, 50))
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        out = [prog(ws, xs) for _ in range(reps)]
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps / len(ws))
    return best


def candidates(scheme: str, m: int) -> list[GS]:
    """Launch parameters to try, the prior first (duplicates dropped by the caller)."""
    prior = ql.prior_sizes(scheme, m)
    bm = max(16, 1 << (m - 1).bit_length())
    out = [prior]
    if scheme != "w8a8" and m == 1:  # splits=1: no partial sums to add after the kernel
        return out + [GS(1, 64, 256, gemv=True, target_programs=528),
                      GS(1, 128, 64, gemv=True),
                      GS(1, 32, 256, gemv=True, target_programs=1056),
                      GS(1, 128, 128, gemv=True, num_warps=8, num_stages=4),
                      GS(1, 32, 256, gemv=True, splits=1),
                      GS(1, 16, 512, gemv=True, splits=1),
                      GS(16, 64, 128), GS(16, 128, 128, num_stages=4)]
    if scheme != "w8a8" and m == 8:
        out += [GS(1, 64, 256, gemv=True, target_programs=528)]
    return out + [GS(bm, 64, 128), GS(bm, 32, 256, target_programs=528),
                  GS(bm, 128, 128, num_stages=4)]


def _norm(scheme: str, s: GS) -> GS:
    """int4's block_k is G/2 whatever is asked: candidates equal after that are one."""
    return dataclasses.replace(s, block_k=64) if scheme == "int4" else s


def entry(s: GS) -> tuple[int, ...]:
    """A GemmSizes as quant_tuning.TUNED's value tuple."""
    return (s.block_m, s.block_n, s.block_k, s.splits, s.num_warps, s.num_stages, int(s.gemv))


class Sweep:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self._data: dict = {}

    def data(self, scheme: str, name: str, m: int):
        """The (weights, activations) of one scheme and shape, made once (the previous
        shape's freed)."""
        k, n = SHAPES[name]
        wkey = (scheme if scheme != "w8a8" and scheme != "fp8w" else "fp8", name)
        if wkey not in self._data:
            self._data = {kk: v for kk, v in self._data.items() if kk[1] == name}
            one = weight_bytes(make_weight(wkey[0], k, 16, jax.random.key(0))) * n // 16
            count = int(np.clip(PROGRAM_BYTES // one, 2, 16))
            keys = jax.random.split(jax.random.key(zlib.crc32(repr(wkey).encode())), count)
            self._data[wkey] = [make_weight(wkey[0], k, n, kk) for kk in keys]
        ws = self._data[wkey]
        xs = [(jax.random.normal(jax.random.key(i), (m, k), jnp.float32)).astype(jnp.bfloat16)
              for i in range(len(ws))]
        return ws, xs

    def time(self, scheme: str, name: str, m: int, path: str, sizes: GS | None = None
             ) -> float | None:
        label = f"{scheme} {name} M={m} {path}" + (f" {entry(sizes)}" if sizes else "")
        if time.monotonic() > self.deadline:
            self.skipped.append(label)
            return None
        ws, xs = self.data(scheme, name, m)
        try:
            t = per_gemm_s(gemm_fn(scheme, sizes, path), ws, xs)
        except Exception as e:  # a tile Triton refuses (shared memory, registers): go on
            print(f"  {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            return None
        k, n = SHAPES[name]
        gbs = weight_bytes(ws[0]) / t / 1e9
        row = dict(scheme=scheme, shape=name, k=k, n=n, m=m, path=path, us=t * 1e6,
                   weight_gbs=gbs, sizes=entry(sizes) if sizes else None)
        self.rows.append(row)
        print(f"{label:<62} {t * 1e6:9.2f} us {gbs:7.0f} GB/s", flush=True)
        return t

    def save(self, paste: list[str]) -> None:
        (self.out / "gemm_sweep.json").write_text(json.dumps(self.rows, indent=1))
        (self.out / "quant_tuning_paste.txt").write_text("\n".join(paste) + "\n")


def run(out: Path, budget_s: float = 200.0) -> None:
    sw = Sweep(out, budget_s)
    best: dict[tuple, tuple[float, GS]] = {}
    prior_t: dict[tuple, float] = {}
    for m in MS:
        print(f"== M={m}: bf16, XLA's W8A8{', the backend paths' if m == MS[0] else ''}, "
              f"then the kernels' candidates", flush=True)
        for name in SHAPES:
            sw.time("bf16", name, m, "model")
            sw.time("w8a8", name, m, "xla")
            for scheme in ("int4", "fp8w", "int8") if m == MS[0] else ():
                if not (scheme == "int4" and name == "lm_head"):
                    sw.time(scheme, name, m, "model")
        for scheme in ("int4", "fp8w", "w8a8", "int8"):
            for name, (k, n) in SHAPES.items():
                if scheme == "int4" and name == "lm_head":
                    continue
                seen = set()
                for i, sz in enumerate(candidates(scheme, m)):
                    if _norm(scheme, sz) in seen:
                        continue
                    seen.add(_norm(scheme, sz))
                    t = sw.time(scheme, name, m, "kernel", sz)
                    if t is None:
                        continue
                    key = (scheme, m, k, n)
                    if i == 0:
                        prior_t[key] = t
                    if key not in best or t < best[key][0]:
                        best[key] = (t, sz)
    paste = ["    # (scheme, m, k, n): (block_m, block_n, block_k, splits, num_warps, "
             "num_stages, gemv)  -- H200 sweep, scripts/gpu/quant.sh gemm"]
    for key, (t, sz) in sorted(best.items()):
        p = prior_t.get(key)
        if p is not None and t < 0.97 * p:
            paste.append(f"    {key!r}: {entry(sz)!r},  # {t * 1e6:.1f} us (prior "
                         f"{p * 1e6:.1f})")
    woq_wins = []
    for m in sorted(MS):  # fp8: weight-only vs W8A8 (ours or XLA's), summed over the shapes
        woq, w8 = 0.0, 0.0
        shapes = [k[2:] for k in best if k[0] == "fp8w" and k[1] == m
                  and ("w8a8", m, *k[2:]) in best]
        for kn in shapes:
            xla = [r["us"] / 1e6 for r in sw.rows
                   if r["path"] == "xla" and r["m"] == m and (r["k"], r["n"]) == kn]
            woq += best[("fp8w", m, *kn)][0]
            w8 += min([best[("w8a8", m, *kn)][0], *xla])
        if shapes:
            woq_wins.append((m, woq < w8))
            paste.append(f"# fp8 M={m}: weight-only {woq * 1e6:.1f} us, W8A8 {w8 * 1e6:.1f} "
                         f"us over {len(shapes)} shapes")
    if woq_wins:  # the largest M up to which weight-only won at every measured M
        upto = 0
        for m, won in woq_wins:
            if not won:
                break
            upto = m
        paste.append(f"FP8_WEIGHT_ONLY_MAX_M = {upto}  # (now "
                     f"{quant_tuning.FP8_WEIGHT_ONLY_MAX_M}; measured M: "
                     f"{', '.join(str(m) for m, _ in woq_wins)})")
    if sw.skipped:
        paste.append(f"# skipped at the {budget_s:.0f} s budget: {len(sw.skipped)} timings, "
                     f"from {sw.skipped[0]}")
    print("\n".join(paste), flush=True)
    sw.save(paste)
