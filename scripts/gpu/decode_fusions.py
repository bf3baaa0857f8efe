"""On a GPU: the decode step of the Llama-3.1-8B shape (bf16, dummy weights, ctx 1024) with
the batch-1 fusions on and off, against the copy-bandwidth roofline (issue 20, item 3).

Usage: PYTHONPATH=. python3 scripts/gpu/decode_fusions.py OUTDIR [VARIANT ...]

Variants (default: all): base (gate and up apart, XLA's two K/V scatters, XLA's add and
norm), gate_up, kv_write, add_norm (each alone on top of base), all (the three). q/k/v are
fused in every variant, as the engine loads them. Each is timed at the batches of
$PROBE_BATCHES (default "1 64"): the step here is the model's forward over the backend and a
greedy argmax (what the engine's step runs, less its sampler), KV cache donated, timed over
$PROBE_REPS calls after warm-up. The last variant is then profiled at the batches of
$PROBE_PROFILE (default 1; GPU kernel time per step summed by kernel name). Writes
OUTDIR/fusions.txt (table and profile) and OUTDIR/fusions.json; $XLA_FLAGS apply to the
whole process (scripts/gpu/decode_fusions.sh runs one process per flag set). PROBE_MODEL=tiny
runs a small model (a smoke test on the CPU, kernels interpreted). PROBE_QUANT (fp8, int8,
int4) quantizes the weights as the loader does (engine.loader.quantize) and PROBE_KV=fp8
makes the KV cache e4m3; the programs are made as the engine makes them
(Backend.prepare_weights, options_for, jit). PROBE_WOQ_MAX_M and PROBE_FP8_WO_MAX_M replace
quant_linear.WOQ_MAX_M (for every format) and quant_tuning.FP8_WEIGHT_ONLY_MAX_M (the row
counts up to which the weight-only formats take the fused kernel, and fp8 runs weight-only),
to time other choices.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine.attention import AttentionMetadata
from engine.backend import get_backend
from engine.bench.roofline import ModelCost, copy_bandwidth
from engine.loader.quantize import quantize_params
from engine.model.config import ModelConfig
from engine.model.presets import preset_config
from engine.model.weights import fuse_gate_up, fuse_qkv, random_params
from engine.runner import model_forward

VARIANTS = {  # name -> (gate/up fused, backend options)
    "base": (False, {"kv_write": "xla", "add_norm": "xla"}),
    "gate_up": (True, {"kv_write": "xla", "add_norm": "xla"}),
    "kv_write": (False, {"kv_write": "pallas", "add_norm": "xla"}),
    "add_norm": (False, {"kv_write": "xla", "add_norm": "pallas"}),
    "all": (True, {"kv_write": "pallas", "add_norm": "pallas"}),
}
CTX, PAGE = 1024, 16
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048}


def decode_metadata(batch: int, num_pages: int) -> tuple[AttentionMetadata, np.ndarray]:
    """A decode-only step of `batch` sequences at CTX tokens of context, padded as the runner
    pads it (tokens = sequences = a power of two, at least 16); sequence s owns pages
    [s * P, (s + 1) * P) of a table P pages wide. Returns (metadata, logits rows)."""
    s = max(16, 1 << (batch - 1).bit_length())
    p = 1 << (-(-(CTX + 1) // PAGE) - 1).bit_length()  # [S, P]: P pages of table per sequence
    table = np.zeros((s, p), np.int32)
    table[:batch] = np.arange(batch * p, dtype=np.int32).reshape(batch, p)
    pos = np.zeros(s, np.int32)
    pos[:batch] = CTX
    slots = np.full(s, num_pages * PAGE, np.int32)  # padding: past the cache, dropped
    slots[:batch] = table[:batch, CTX // PAGE] * PAGE + CTX % PAGE
    lens = np.zeros(s, np.int32)
    lens[:batch] = CTX + 1
    qs = np.minimum(np.arange(s + 1), batch).astype(np.int32)
    md = AttentionMetadata(positions=pos, slot_mapping=slots,
                           token_seq=np.arange(s, dtype=np.int32), query_start=qs,
                           seq_lens=lens, page_table=table,
                           num_tokens=np.int32(batch), page_size=PAGE, decode_only=True)
    return md, np.arange(s, dtype=np.int32)


def timed(f: Any, kv: Any, args: tuple, reps: int) -> tuple[float, Any]:
    for _ in range(3):
        kv, tok = f(kv, *args)
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(reps):
        kv, tok = f(kv, *args)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t0) / reps, kv


def main(out: str, names: list[str]) -> None:
    gpu = jax.default_backend() == "gpu"
    from backends.gpu.kernels import quant_linear, quant_tuning

    if "PROBE_WOQ_MAX_M" in os.environ:
        quant_linear.WOQ_MAX_M = dict.fromkeys(quant_linear.WOQ_MAX_M,
                                               int(os.environ["PROBE_WOQ_MAX_M"]))
    if "PROBE_FP8_WO_MAX_M" in os.environ:
        quant_tuning.FP8_WEIGHT_ONLY_MAX_M = int(os.environ["PROBE_FP8_WO_MAX_M"])
    model = os.environ.get("PROBE_MODEL", "llama-3.1-8b")
    cfg = ModelConfig.from_hf(TINY) if model == "tiny" else preset_config(model)
    batches = [int(b) for b in os.environ.get("PROBE_BATCHES", "1 64").split()]
    reps = int(os.environ.get("PROBE_REPS", "50" if gpu else "2"))
    profiled = [int(b) for b in os.environ.get("PROBE_PROFILE", "1").split()]
    dtype = jnp.bfloat16 if gpu else jnp.float32
    split = fuse_qkv(random_params(cfg, dtype, scan=False))  # gate and up apart
    fused = {**split, "layers": [dict(lp) for lp in split["layers"]]}  # shares all but gate/up
    fuse_gate_up(fused)
    bw = copy_bandwidth()
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    p = 1 << (-(-(CTX + 1) // PAGE) - 1).bit_length()
    num_pages = max(batches) * p
    quant = os.environ.get("PROBE_QUANT")
    kv_dtype = jnp.float8_e4m3fn if os.environ.get("PROBE_KV") == "fp8" else dtype
    lines = [f"{model}, weights {quant or jnp.dtype(dtype).name} (WOQ_MAX_M "
             f"{quant_linear.WOQ_MAX_M}, FP8_WEIGHT_ONLY_MAX_M "
             f"{quant_tuning.FP8_WEIGHT_ONLY_MAX_M}), KV "
             f"{jnp.dtype(kv_dtype).name}, {jax.devices()[0].device_kind}, "
             f"copy bandwidth {bw / 1e9:.0f} GB/s, "
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
             f"{'variant':<9} {'batch':>5} {'step ms':>8} {'roofline ms':>11} {'ratio':>6}"]
    print(lines[0], flush=True)
    results = []
    for name in names:
        gate_up, options = VARIANTS[name]
        backend = get_backend("cuda", {**options, "interpret": not gpu})
        params = fused if gate_up else split
        if quant:  # a copy of the tree (the arrays shared until replaced), quantized
            params = quantize_params({**params, "layers": [dict(lp) for lp in params["layers"]]},
                                     cfg, quant, None)
        params = backend.prepare_weights(params)
        backend.compiler_options = backend.options_for(params)
        cost = ModelCost.of(cfg, params, jnp.dtype(kv_dtype).itemsize)
        fwd = model_forward(cfg, backend)
        for b in batches:
            md, idx = decode_metadata(b, num_pages)
            # step inputs as the runner passes them: device arrays, not constants
            args = (params, jnp.zeros(md.positions.shape, jnp.int32),
                    jax.tree.map(jnp.asarray, md), jnp.asarray(idx))

            def step(kv, params, tokens, md, idx, fwd=fwd):
                logits, kv = fwd(params, kv, tokens, md, idx)
                return kv, jnp.argmax(logits, axis=-1)

            step = backend.jit(step, donate_argnums=(0,))
            shape = backend.kv_cache_shape(num_pages, PAGE, hkv, d)
            kv = [(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
                  for _ in range(cfg.num_layers)]
            t, kv = timed(step, kv, args, reps)
            roof = cost.step_bytes(b, b * (CTX + 1)) / bw
            results.append(dict(variant=name, batch=b, step_ms=t * 1e3, roofline_ms=roof * 1e3,
                                ratio=t / roof))
            lines.append(f"{name:<9} {b:>5} {t * 1e3:>8.3f} {roof * 1e3:>11.3f} "
                         f"{t / roof:>6.2f}")
            print(lines[-1], flush=True)
            if b in profiled and name == names[-1] and gpu:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
                from cuda_probe import kernel_table

                tdir = tempfile.mkdtemp(prefix="fusions-trace-")  # not under OUT: many files
                with jax.profiler.trace(tdir, create_perfetto_trace=True):
                    for _ in range(5):
                        kv, tok = step(kv, *args)
                    jax.block_until_ready(tok)
                lines += ["", f"profile of {name} at batch {b}:",
                          kernel_table(tdir, 5, int(os.environ.get("PROBE_TOP", "30")))]
                print("\n".join(lines[-3:]), flush=True)
            del kv
    Path(out).mkdir(parents=True, exist_ok=True)
    tag = os.environ.get("PROBE_TAG", "")
    (Path(out) / f"fusions{tag}.txt").write_text("\n".join(lines) + "\n")
    (Path(out) / f"fusions{tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
