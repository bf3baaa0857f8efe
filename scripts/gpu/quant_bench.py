"""On a GPU: the quantized GEMMs against bf16, and the 8B shape's logits per scheme against bf16.

    gemm    K=4096, N in (28672, 4096), M in (1, 32, 256, 8192): bf16 (x @ w [K, N], the
            model's dot), fp8 W8A8 through XLA's dot (with and without the activation
            quantization) and through our Pallas kernel at a few tile sizes, int8 and int4
            weight-only through the backend's path; ms, TFLOP/s, weight GB/s, the ratio to
            bf16 and each result's error against the plain-JAX reference. Says whether XLA
            rewrote the FP8 dot to cuBLASLt's FP8 matmul.
    logits  Llama-3.1-8B shape, random weights, one sequence: a prompt of P tokens, then D
            decode steps, in bf16 and with each scheme (fp8, int8, int4 weights; fp8 KV;
            fp8 weights + fp8 KV): the relative logit error and top-1 agreement against bf16.

Usage: PYTHONPATH=. python3 scripts/gpu/quant_bench.py OUT gemm logits [--layers N]
Writes OUT/gemm.json, OUT/logits.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from backends.cuda.backend import CudaBackend
from backends.gpu.kernels import quant_linear as ql
from engine.attention import AttentionMetadata
from engine.loader.quantize import quantize_params
from engine.model.config import ModelConfig
from engine.model.llama import forward
from engine.model.presets import PRESETS
from engine.model.quant import fp8_rows, pack, reference_linear, w8a8_reference
from engine.model.weights import fuse_qkv, random_params


def timed(f, *args, reps: int = 20) -> float:
    """Median seconds of f(*args) (compiled and warmed first)."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# The tunings tried beside the defaults (the first of each list), few: each is a compile.
SMALL_VARIANTS = [ql.SMALL, ql.GemmSizes(16, 32, 256)]
LARGE_VARIANTS = [ql.LARGE, ql.GemmSizes(128, 256, 128, num_warps=8)]


K, NS, MS = 4096, (28672, 4096), (1, 32, 256, 8192)
"""The GEMM stage's shapes: Llama-3.1-8B's gate/up (N 28672, fused) and its square ones."""


def gemm(out: Path) -> None:
    k = K
    rows = []
    key = jax.random.key(0)
    for n in NS:
        w_kn = (jax.random.normal(key, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        packed = {f: pack(w_kn, 1, f) for f in ("fp8", "int8", "int4")}
        hlo = jax.jit(functools.partial(ql.w8a8_xla, out_dtype=jnp.bfloat16)).lower(
            *fp8_rows(jnp.ones((16, k), jnp.bfloat16)), packed["fp8"].data,
            packed["fp8"].scales).compile().as_text()
        print(f"N={n}: XLA's FP8 dot -> cuBLASLt FP8: {'__cublas$lt$matmul$f8' in hlo}")
        for m in MS:
            x = (jax.random.normal(jax.random.key(m), (m, k), jnp.float32)).astype(jnp.bfloat16)
            flop, wbytes = 2 * m * n * k, {"bf16": 2 * n * k, "fp8": n * k, "int8": n * k,
                                           "int4": n * k // 2}
            base = timed(jax.jit(lambda x, w: x @ w), x, w_kn)
            cases = {"bf16": (base, 0.0)}
            wf8 = packed["fp8"]
            ref8 = w8a8_reference(x, wf8) if m <= 256 else None
            f = jax.jit(lambda x, w: ql.quant_linear(x, w, fp8_gemm="xla"))
            cases["fp8 xla"] = (timed(f, x, wf8), rel_err(f(x, wf8), ref8) if ref8 is not None
                                else float("nan"))
            xq, sx = jax.jit(fp8_rows)(x)
            g = jax.jit(functools.partial(ql.w8a8_xla, out_dtype=jnp.bfloat16))
            cases["fp8 xla (no x quant)"] = (timed(g, xq, sx, wf8.data, wf8.scales), float("nan"))
            for sz in (SMALL_VARIANTS if m <= ql.SMALL_M else LARGE_VARIANTS):
                bm = max(16, min(sz.block_m, 1 << (m - 1).bit_length()))
                sz = dataclasses.replace(sz, block_m=bm)
                h = jax.jit(lambda x, w, sz=sz: ql.w8a8_pallas(
                    *fp8_rows(x), w.data, w.scales, out_dtype=jnp.bfloat16, sizes=sz))
                try:
                    cases[f"fp8 pallas {sz.block_m}x{sz.block_n}x{sz.block_k} w{sz.num_warps}"] = (
                        timed(h, x, wf8), rel_err(h(x, wf8), ref8) if ref8 is not None else
                        float("nan"))
                except Exception as e:  # a tile Triton refuses: say so, go on
                    print(f"  fp8 pallas {sz}: {type(e).__name__}: {str(e)[:200]}")
            for fmt in ("int8", "int4"):
                w = packed[fmt]
                f = jax.jit(lambda x, w: ql.quant_linear(x, w))
                ref = reference_linear(x, w) if m <= 256 else None
                cases[fmt] = (timed(f, x, w), rel_err(f(x, w), ref) if ref is not None
                              else float("nan"))
                if m <= ql.WOQ_MAX_M:
                    h = jax.jit(lambda x, w: ql.dequantized_dot(x, w))
                    cases[f"{fmt} dequantize + XLA dot"] = (timed(h, x, w), rel_err(h(x, w), ref))
                if m <= ql.SMALL_M:
                    for sz in SMALL_VARIANTS[1:]:
                        sz = dataclasses.replace(sz, block_m=16 if m <= 16 else 32)
                        h = jax.jit(lambda x, w, sz=sz: ql.woq_pallas(x, w, sizes=sz))
                        try:
                            bk = f" bk{sz.block_k}" if fmt == "int8" else ""  # int4: G/2
                            cases[f"{fmt} bn{sz.block_n}{bk} w{sz.num_warps}"] = (
                                timed(h, x, w), rel_err(h(x, w), ref))
                        except Exception as e:
                            print(f"  {fmt} {sz}: {type(e).__name__}: {str(e)[:200]}")
            for name, (t, err) in cases.items():
                fmt = name.split()[0]
                row = dict(n=n, k=k, m=m, path=name, ms=t * 1e3, tflops=flop / t / 1e12,
                           weight_gbs=wbytes[fmt] / t / 1e9, vs_bf16=t / base, rel_err=err)
                rows.append(row)
                print(f"N={n:>5} M={m:>4} {name:<34} {t * 1e3:8.4f} ms {row['tflops']:7.1f} "
                      f"TFLOP/s {row['weight_gbs']:7.0f} GB/s  x{t / base:5.2f} bf16  "
                      f"err {err:.1e}", flush=True)
    (out / "gemm.json").write_text(json.dumps(rows, indent=1))


def logits(out: Path, layers: int | None, n_prompt: int = 512, n_decode: int = 16) -> None:
    hf = dict(PRESETS["llama-3.1-8b"])
    if layers:
        hf["num_hidden_layers"] = layers
    cfg = ModelConfig.from_hf(hf)
    page = 16
    base = fuse_qkv(random_params(cfg, jnp.bfloat16, scan=False))
    rng = np.random.default_rng(0)
    ids = rng.integers(10, cfg.vocab_size // 2, size=n_prompt + n_decode).tolist()
    be = CudaBackend()
    num_pages = (n_prompt + n_decode) // page + 2
    pt = np.arange(num_pages, dtype=np.int32)[None, :]
    pt = np.pad(pt, ((0, 0), (0, (1 << (num_pages - 1).bit_length()) - num_pages)))

    def run(params, kv_dtype) -> np.ndarray:  # logits f32 [P + D, V]
        kv = be.allocate_kv(cfg, num_pages, page, kv_dtype, scan=False)
        fwd = jax.jit(functools.partial(
            forward, cfg=cfg, attend=functools.partial(be.attention, scale=cfg.head_dim**-0.5),
            write=be.write_kv, linear=be.linear), donate_argnums=(1,))
        got = []
        for start, n in [(0, n_prompt)] + [(n_prompt + i, 1) for i in range(n_decode)]:
            md = AttentionMetadata.one_sequence(start, n, pt, page, num_pages)
            tok = np.zeros(md.positions.shape[0], np.int32)
            tok[:n] = ids[start:start + n]
            lg, kv = fwd(params, kv, tok, md, np.arange(n, dtype=np.int32))
            got.append(np.asarray(lg, np.float32))
        return np.concatenate(got)

    ref = run(base, jnp.bfloat16)
    results = []
    for scheme, kv_dtype in (("fp8", jnp.bfloat16), ("int8", jnp.bfloat16),
                             ("int4", jnp.bfloat16), ("bf16", jnp.float8_e4m3fn),
                             ("fp8", jnp.float8_e4m3fn)):
        params = base
        if scheme != "bf16":
            params = {**base, "layers": [dict(lp) for lp in base["layers"]]}
            quantize_params(params, cfg, scheme, None)
        got = run(params, kv_dtype)
        del params
        r = dict(weights=scheme, kv=jnp.dtype(kv_dtype).name, positions=len(ref),
                 rel_err=rel_err(got, ref), top1=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                 prefill_rel_err=rel_err(got[:n_prompt], ref[:n_prompt]),
                 decode_rel_err=rel_err(got[n_prompt:], ref[n_prompt:]))
        results.append(r)
        print(f"weights {scheme:<5} kv {r['kv']:<14} vs bf16 over {len(ref)} positions: "
              f"rel err {r['rel_err']:.4f} (prefill {r['prefill_rel_err']:.4f}, decode "
              f"{r['decode_rel_err']:.4f}), top-1 {r['top1']:.3f}", flush=True)
    (out / "logits.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    args = sys.argv[2:]
    layers = None
    if "--layers" in args:
        i = args.index("--layers")
        layers = int(args[i + 1])
        del args[i:i + 2]
    for stage in args or ["gemm", "logits"]:
        print(f"== {stage}", flush=True)
        if stage == "gemm":
            gemm(out)
        elif stage == "logits":
            logits(out, layers)
        else:
            raise SystemExit(f"unknown stage {stage!r}: gemm or logits")


if __name__ == "__main__":
    main()
