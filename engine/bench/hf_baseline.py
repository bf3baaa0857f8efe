"""`--baseline hf`: the same workload through HF transformers `generate` (static batches)."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from engine.bench.datasets import BenchRequest, make_requests
from engine.bench.offline import OfflineResult


def baseline(args: argparse.Namespace) -> OfflineResult:
    """The workload's first --hf-num-prompts requests through HF generate (after a warm-up
    batch). Run before the engine starts, and its GPU memory freed after: once JAX has taken
    its share of the card, HF's model would not fit beside it."""
    import torch

    # torch's ROCm build answers to torch.cuda and the device name "cuda" too.
    gpu = args.backend in ("cuda", "rocm", "auto") and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    model = load_hf_model(args.model, args.load_format or "auto", dtype, device)
    reqs = make_requests(args, model.config.vocab_size)
    reqs = reqs[:args.hf_num_prompts] if args.hf_num_prompts else reqs
    run_hf(model, reqs[:args.hf_batch_size], args.hf_batch_size, device)  # warm-up
    result = run_hf(model, reqs, args.hf_batch_size, device)
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def load_hf_model(model: str | None, load_format: str, dtype: str, device: str):
    """The HF model on the same weights as ours (random init of the same config for dummy)."""
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if load_format == "dummy":
        from engine.model.presets import PRESETS

        hf_cfg = PRESETS.get((model or "").lower())
        cfg = (transformers.AutoConfig.for_model(**hf_cfg) if hf_cfg
               else transformers.AutoConfig.from_pretrained(model))
        with torch.device(device):  # random init on the GPU: minutes faster than on the CPU
            m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    else:
        path = model_path(model)
        if path.suffix == ".gguf":
            m = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    return m.to(device).eval()


def model_path(model: str | None) -> Path:
    """The weights' file or folder: an alias (or None, the default model) fetched first."""
    from engine.loader import hub

    return Path(hub.fetch_model(model) if model is None or model in hub.ALIASES else model)


def run_hf(model, reqs: list[BenchRequest], batch_size: int, device: str) -> OfflineResult:
    """Static batching: each batch is left-padded and decodes to its longest output."""
    import torch

    t0 = time.perf_counter()
    useful = 0
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(r.prompt_ids) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, width - len(r.prompt_ids):] = 1
        n = max(r.output_len for r in chunk)
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        useful += sum(r.output_len for r in chunk)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return OfflineResult(name=f"hf transformers (batch {batch_size}, {len(reqs)} prompts)",
                         requests=len(reqs),
                         elapsed_s=time.perf_counter() - t0,
                         input_tokens=sum(len(r.prompt_ids) for r in reqs), output_tokens=useful)
