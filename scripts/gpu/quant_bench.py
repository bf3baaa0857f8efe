"""On a GPU: the quantized GEMMs against bf16, and the 8B shape's logits per scheme against bf16.

    gemm    the 8B model's GEMM shapes at M = 16, 1, 8, 32, 64: bf16, each quantized scheme's
            path and a sweep of the kernels' launch parameters, many GEMMs per timed
            program (not launch-bound); weight GB/s, and the winners as lines to paste
            into backends/gpu/kernels/quant_tuning.py (scripts/gpu/gemm_sweep.py). Within
            a budget of --budget seconds (default 200).
    logits  Llama-3.1-8B shape, random weights, one sequence: a prompt of P tokens, then D
            decode steps, in bf16 and with each scheme (fp8, int8, int4 weights; fp8 KV;
            fp8 weights + fp8 KV): the relative logit error and top-1 agreement against bf16.

Usage: PYTHONPATH=. python3 scripts/gpu/quant_bench.py OUT gemm logits [--layers N]
                                                            [--budget S]
Writes OUT/gemm_sweep.json, OUT/quant_tuning_paste.txt, OUT/logits.json.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import gemm_sweep  # scripts/gpu/gemm_sweep.py: this script's folder is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from backends.cuda.backend import CudaBackend
from engine.attention import AttentionMetadata
from engine.loader.quantize import quantize_params
from engine.model.config import ModelConfig
from engine.model.llama import forward
from engine.model.presets import PRESETS
from engine.model.weights import fuse_qkv, random_params


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


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
    layers, budget = None, 200.0
    if "--layers" in args:
        i = args.index("--layers")
        layers = int(args[i + 1])
        del args[i:i + 2]
    if "--budget" in args:
        i = args.index("--budget")
        budget = float(args[i + 1])
        del args[i:i + 2]
    for stage in args or ["gemm", "logits"]:
        print(f"== {stage}", flush=True)
        if stage == "gemm":
            gemm_sweep.run(out, budget)
        elif stage == "logits":
            logits(out, layers)
        else:
            raise SystemExit(f"unknown stage {stage!r}: gemm or logits")


if __name__ == "__main__":
    main()
