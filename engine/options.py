"""The engine options every subcommand that builds an engine shares: the argparse table, the
names it fills, and the LLM they make. Below the CLI, so that precompile, bench and serve take
it without importing `engine.cli` (which imports them)."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that builds an engine (None: not given)."""
    p.add_argument("--model", default=None, help="HF directory, .gguf file or alias "
                   "(default: smollm2-135m-instruct)")
    p.add_argument("--backend", default="auto", help="cpu, cuda, rocm, tpu, ... or auto")
    p.add_argument("--config", default=None, help="YAML config file or preset name in configs/")
    p.add_argument("--interpret", action="store_true", default=None,
                   help="run the backend's kernels in the Pallas interpreter on the CPU: slow; "
                   "for tests and porting (without it, tpu and cuda need their hardware)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--load-format", default=None, choices=["auto", "dummy", "orbax"],
                   help="auto: by the path (an orbax folder is detected); dummy: random "
                   "weights; orbax: an `engine convert` folder, restored onto the mesh")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument("--schedule-policy", default=None, choices=["fcfs", "lpm"])
    p.add_argument("--disable-radix-cache", action="store_true", default=None)
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare the next step on the host while the device runs this one")
    p.add_argument("--warmup-decode-len", type=int, default=None,
                   help="compile the decode step for contexts up to this length at start-up")
    p.add_argument("--warmup-prompt-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="with --warmup-decode-len: also compile the large prefill-chunk steps")
    p.add_argument("--warmup-threads", type=int, default=None,
                   help="warm-up programs compiled at once (default 0: one per CPU core)")
    p.add_argument("--warmup-executables", action=argparse.BooleanOptionalAction,
                   default=None, help="keep warm-up's programs serialized; a later start "
                   "loads them without tracing (on in the CUDA presets)")
    p.add_argument("--page-buckets", default=None, choices=["pow2", "max"],
                   help="page-table widths of the step programs (max: one, fewer programs)")
    p.add_argument("--wide-tokens", type=int, default=None,
                   help="steps with prompt tokens of this many tokens and up take the largest "
                        "sequence bucket")
    p.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                   help="one q/k/v weight (one GEMM a layer) once loaded (default: on)")
    p.add_argument("--fuse-gate-up", action=argparse.BooleanOptionalAction, default=None,
                   help="one MLP gate+up weight (one GEMM a layer) once loaded (default: on)")
    p.add_argument("--quantization", default=None,
                   choices=["int8", "gguf", "f32", "fp8", "int4", "auto"],
                   help="int8: weight-only per-channel int8 made at load; gguf: keep a GGUF "
                   "file's Q8_0/Q4_0/Q4_1 blocks as they are; f32: float32 weights laid out "
                   "for the CPU kernels; fp8: e4m3 weights per channel (W8A8 on the GPU); "
                   "int4: weight-only, group-wise scales and zero points; auto: gguf for a "
                   ".gguf file, else f32")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"],
                   help="KV cache element type: auto (the model's dtype) or fp8 (e4m3, scale "
                   "1: twice the tokens in the same memory)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--npu-device", default=None, choices=["npu", "cpu"],
                   help="--backend npu: run on the Ascend NPU (torch_npu) or on CPU torch with "
                        "the reference ops (default: npu)")
    p.add_argument("--speculative-algorithm", default=None,
                   choices=["ngram", "draft", "eagle", "eagle3"],
                   help="speculative decoding: ngram (prompt lookup), draft (a draft model) "
                        "or eagle (eagle3: an EAGLE-3 head, --speculative-draft-model)")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="draft tokens per decode and step (default 4)")
    p.add_argument("--speculative-ngram-min", type=int, default=None,
                   help="ngram: shortest suffix looked up (default 1)")
    p.add_argument("--speculative-ngram-max", type=int, default=None,
                   help="ngram: longest suffix looked up, tried first (default 4)")
    p.add_argument("--speculative-draft-model", default=None,
                   help="draft: the draft model (same tokenizer as --model)")
    p.add_argument("--speculative-max-batch", type=int, default=None,
                   help="speculate only while at most this many requests run (default 4)")
    p.add_argument("--speculative-adaptive", action=argparse.BooleanOptionalAction,
                   default=None, help="speculate only while it measures faster than plain "
                   "steps (default on; --no-speculative-adaptive: always)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                   default=None, help="devices to shard the model over (mesh axis 'tp')")
    p.add_argument("--expert-parallel", action="store_true", default=None,
                   help="MoE: shard whole experts over the tp devices")
    p.add_argument("--dist-init-addr", dest="coordinator_address", default=None,
                   help="multi-host: host:port of process 0 (jax.distributed)")
    p.add_argument("--nnodes", dest="num_processes", type=int, default=None,
                   help="multi-host: number of processes")
    p.add_argument("--node-rank", dest="process_id", type=int, default=None,
                   help="multi-host: this process's index")


ENGINE_OPTIONS = ("dtype", "load_format", "max_model_len", "page_size", "max_total_tokens",
                  "max_running_requests", "chunked_prefill_size", "schedule_policy",
                  "disable_radix_cache", "overlap_schedule", "warmup_decode_len",
                  "warmup_prompt_steps", "page_buckets", "wide_tokens", "fuse_qkv",
                  "fuse_gate_up",
                  "quantization", "kv_cache_dtype", "seed", "warmup_threads", "warmup_executables",
                  "tensor_parallel_size", "expert_parallel", "coordinator_address",
                  "num_processes", "process_id", "interpret", "npu_device",
                  "speculative_algorithm", "speculative_num_draft_tokens",
                  "speculative_ngram_min", "speculative_ngram_max", "speculative_draft_model",
                  "speculative_max_batch", "speculative_adaptive")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line (those left at None are not given)."""
    return {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k, None) is not None}


def make_llm(args: argparse.Namespace):
    from engine.llm import LLM

    opts = engine_options(args)
    dtype = opts.pop("dtype", None)
    return LLM(args.model, backend=args.backend, dtype=dtype, config=args.config, **opts)
