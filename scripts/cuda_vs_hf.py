"""On a GPU: our model on the CUDA backend vs HF transformers on the same random weights.

Prefill (the mixed-batch path) and then decode steps (the Pallas decode kernel) of one
sequence, in bf16; prints the relative logit error and top-1 agreement against HF's
forward in float32 on the same weights, next to HF's own bf16 forward for scale.
Usage: PYTHONPATH=. python3 scripts/cuda_vs_hf.py [preset] [num_layers] [prompt_len]
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
import transformers

from backends.cuda.backend import CudaBackend
from engine.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.llama import forward
from engine.model.presets import PRESETS
from engine.model.weights import fuse_qkv, params_from_hf


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    n_prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    n_decode, page = 8, 16
    hf_cfg = dict(PRESETS[name], num_hidden_layers=layers)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_cfg), dtype=torch.bfloat16).eval()
    cfg = ModelConfig.from_hf(hf_cfg)
    params = fuse_qkv(params_from_hf({k: to_numpy(v) for k, v in hf.state_dict().items()},
                                     cfg, jnp.bfloat16, scan=False))  # as the engine loads
    rng = np.random.default_rng(0)
    ids = rng.integers(10, cfg.vocab_size // 2, size=n_prompt + n_decode).tolist()
    with torch.no_grad():
        hf_bf16 = hf(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
        # The reference: the same (bf16-valued) weights computed in float32.
        ref = hf.float()(torch.tensor([ids], device=dev)).logits[0].cpu().numpy()
    del hf

    be = CudaBackend()
    num_pages = (n_prompt + n_decode) // page + 2
    kv = be.allocate_kv(cfg, num_pages, page, jnp.bfloat16, scan=False)
    attend = functools.partial(be.attention, scale=cfg.head_dim**-0.5)
    fwd = jax.jit(functools.partial(forward, cfg=cfg, attend=attend, write=be.write_kv),
                  donate_argnums=(1,))
    pt = np.arange(num_pages, dtype=np.int32)[None, :]
    pt = np.pad(pt, ((0, 0), (0, (1 << (num_pages - 1).bit_length()) - num_pages)))
    got = []
    chunks = [(0, n_prompt)] + [(n_prompt + i, 1) for i in range(n_decode)]
    for start, n in chunks:
        md = AttentionMetadata.one_sequence(start, n, pt, page, num_pages)
        tok = np.zeros(md.positions.shape[0], np.int32)
        tok[:n] = ids[start:start + n]
        logits, kv = fwd(params, kv, tok, md, np.arange(n, dtype=np.int32))
        got.append(np.asarray(logits))
    got = np.concatenate(got)
    for label, sl in (("prefill", slice(0, n_prompt)), ("decode", slice(n_prompt, None))):
        for who, x in (("ours bf16", got), ("HF bf16", hf_bf16)):
            err = np.linalg.norm(x[sl] - ref[sl]) / np.linalg.norm(ref[sl])
            top1 = (x[sl].argmax(-1) == ref[sl].argmax(-1)).mean()
            print(f"{name} ({layers} layers) {label}, {who} vs HF float32: relative logit "
                  f"error {err:.2e}, top-1 agreement {top1:.3f} over {x[sl].shape[0]} "
                  "positions", flush=True)


if __name__ == "__main__":
    main()
