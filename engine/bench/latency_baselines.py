"""`engine bench latency --baseline hf llama.cpp`: the latency workload through other runtimes.

Each baseline runs the same shape as engine.bench.latency.measure (`batch` prompts of
`input_len` random ids from the lower half of the vocabulary, greedy, `output_len` decode
steps) on the same weights: HF transformers loads the model as engine.bench.hf_baseline does
(a GGUF file dequantized to the engine's dtype), llama.cpp (`llama-cpp-python`, the optional
`bench` extra) runs the GGUF file itself, quantized blocks and all.

prefill_s: the prompt's forward and the first token; decode_step_s: the mean time of each
further token. llama-cpp-python's `Llama` decodes one sequence, so its rows are batch 1 only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

BASELINES = ("hf", "llama.cpp")

LLAMA_CPP_MISSING = (
    "--baseline llama.cpp needs llama-cpp-python, which is not installed: pip install "
    "'.[bench]' (it builds llama.cpp from source, ~6 minutes on 2 cores); the engine and the "
    "other baselines run without it")


def _prompts(rng: np.random.Generator, batch: int, input_len: int, vocab: int) -> np.ndarray:
    return rng.integers(10, vocab // 2, size=(batch, input_len))  # [B, L], as measure() draws


def hf_latency(model, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """HF `generate` (greedy, 1 + output_len new tokens), timed per token by a streamer (HF
    hands it each step's tokens): prefill = until the first token; a decode step = the mean
    time of each later one. One untimed warm-up."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # the prompt (in some versions), then each new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size

    def generate(ids: np.ndarray, n: int) -> tuple[float, float]:
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape,
                           dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=clock)
        new = clock.times[-n:]  # [n] when each new token was ready
        return new[0] - t0, (new[-1] - new[0]) / max(n - 1, 1)

    generate(_prompts(rng, batch, input_len, vocab), 2)  # warm-up
    prefill, step = generate(_prompts(rng, batch, input_len, vocab), 1 + output_len)
    return {"name": "hf transformers", "batch": batch, "input_len": input_len,
            "prefill_s": prefill, "decode_step_s": step}


def load_llama_cpp(path: Path, n_ctx: int):
    """A llama.cpp context on the GGUF file with every core for prompt and decode (the
    binding's default decode threads are half the cores)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise SystemExit(LLAMA_CPP_MISSING) from e
    if path.suffix != ".gguf":
        raise SystemExit(f"--baseline llama.cpp runs a GGUF file; {path} is not one")
    cores = os.cpu_count() or 1
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=cores,
                 n_threads_batch=cores, verbose=False)


def llama_cpp_latency(llm, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Batch 1 through `Llama.generate` (greedy): prefill = until the first token; a decode
    step = the mean time of each later one. `reset()` first, so nothing of an earlier prompt's
    KV is reused (generate would otherwise match a common prefix)."""
    rng = np.random.default_rng(seed)
    vocab = llm.n_vocab()

    def run(ids: list[int], n: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        tokens = llm.generate(ids, top_k=1, temp=0.0, reset=True)
        next(tokens)
        t1 = time.perf_counter()
        for _ in range(n):
            next(tokens)
        return t1 - t0, (time.perf_counter() - t1) / max(n, 1)

    run(_prompts(rng, 1, input_len, vocab)[0].tolist(), 2)  # warm-up
    prefill, step = run(_prompts(rng, 1, input_len, vocab)[0].tolist(), output_len)
    return {"name": "llama.cpp", "batch": 1, "input_len": input_len, "prefill_s": prefill,
            "decode_step_s": step}


def run_baselines(args: argparse.Namespace) -> list[dict]:
    """Every --baseline for every --batch-size (llama.cpp at batch 1 only), before the engine
    loads (see engine.bench.hf_baseline.baseline for why first)."""
    import gc

    from engine.bench.hf_baseline import load_hf_model, model_path

    rows = []
    for name in args.baseline:
        if name == "hf":
            model = load_hf_model(args.model, args.load_format or "auto",
                                  args.dtype or "float32", "cpu")
            rows += [hf_latency(model, b, args.input_len, args.output_len)
                     for b in args.batch_size]
            del model
        elif name == "llama.cpp":
            if 1 not in args.batch_size:
                raise SystemExit("--baseline llama.cpp decodes one sequence: give --batch-size 1")
            llm = load_llama_cpp(model_path(args.model), args.input_len + args.output_len + 16)
            rows.append(llama_cpp_latency(llm, args.input_len, args.output_len))
            del llm
        gc.collect()
    return rows


def compare_line(base: dict, engine: dict) -> str:
    """A baseline's row and how the engine's row of the same batch compares (x > 1: the
    engine is faster)."""
    b, n = base["batch"], base["input_len"]
    prefill_x = base["prefill_s"] / engine["prefill_s"]
    decode_x = base["decode_step_s"] / engine["decode_step_s"]
    return (f"{base['name']:>16} batch {b:>3}: prefill {b * n / base['prefill_s']:8.0f} tok/s, "
            f"step {base['decode_step_s'] * 1e3:8.2f} ms ({b / base['decode_step_s']:7.1f} tok/s)"
            f"; engine / {base['name']}: prefill {prefill_x:.2f}x, decode {decode_x:.2f}x")
