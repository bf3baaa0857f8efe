"""Benchmark workloads as token ids (no dataset download): SGLang's `random` and
`generated-shared-prefix` shapes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def _lens(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> np.ndarray:
    lo = max(1, int(length * range_ratio))
    return rng.integers(lo, length + 1, size=n)


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """Prompts of random token ids; lengths uniform in [len * range_ratio, len]."""
    rng = np.random.default_rng(seed)
    ins, outs = _lens(rng, n, input_len, range_ratio), _lens(rng, n, output_len, range_ratio)
    # Ids from the lower vocabulary: special and rarely-trained ids sit at the top.
    return [BenchRequest(rng.integers(10, vocab_size // 2, size=int(i)).tolist(), int(o))
            for i, o in zip(ins, outs, strict=True)]


def shared_prefix_requests(groups: int, prompts_per_group: int, system_len: int,
                           question_len: int, output_len: int, vocab_size: int,
                           seed: int = 0) -> list[BenchRequest]:
    """`groups` system prompts, each shared by `prompts_per_group` questions; interleaved
    so that a group's requests do not arrive back to back."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(10, vocab_size // 2, size=system_len).tolist() for _ in range(groups)]
    reqs = []
    for _ in range(prompts_per_group):
        for g in range(groups):
            q = rng.integers(10, vocab_size // 2, size=question_len).tolist()
            reqs.append(BenchRequest(systems[g] + q, output_len))
    return reqs


def add_dataset_args(p) -> None:
    p.add_argument("--dataset", default="random", choices=["random", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.5)
    p.add_argument("--gsp-num-groups", type=int, default=8)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=512)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=32)
    p.add_argument("--dataset-seed", type=int, default=0)


def make_requests(args, vocab_size: int) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, vocab_size, args.dataset_seed)
    return shared_prefix_requests(args.gsp_num_groups, args.gsp_prompts_per_group,
                                  args.gsp_system_prompt_len, args.gsp_question_len,
                                  args.gsp_output_len, vocab_size, args.dataset_seed)
