"""Engine configuration: frozen dataclasses by consumer, YAML presets, and precedence.

Precedence: explicit arguments (CLI flags, LLM(...) keywords) > the YAML file > defaults.
A YAML preset in configs/ has sections named after the dataclasses below, e.g.

    backend: {name: cpu, scan_layers: true}
    cache: {page_size: 16, kv_memory_fraction: 0.1}
    scheduler: {chunked_prefill_size: 512, max_running_requests: 64}
    parallel: {tensor_parallel_size: 4}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NOT_ENGINE_SECTIONS = frozenset({"deploy"})
"""Sections of a config file read by others (engine.deploy), skipped by EngineConfig."""


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    model: str | None = None
    """HF directory, .gguf file or alias; None is the default model (SmolLM2-135M-Instruct)."""
    dtype: str | None = None
    """'float32' or 'bfloat16'; None takes the backend's default."""
    fuse_qkv: bool = True
    """One weight for the q/k/v projections once loaded: one GEMM per layer, not three
    (engine.model.weights.fuse_qkv). Kept apart when tensor parallelism replicates the KV
    heads but splits the query heads."""
    fuse_gate_up: bool = True
    """One weight for the MLP's gate and up projections once loaded: one GEMM per layer, not
    two (engine.model.weights.fuse_gate_up); MoE layers are left as they are."""
    load_format: str = "auto"
    """'auto' reads the checkpoint (an orbax folder is recognised); 'dummy' makes random
    weights from the config only; 'orbax' restores an `engine convert` folder onto the mesh."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None: the model's limit, capped by the KV pool."""
    seed: int = 0
    """Seed for requests that bring none (each request still draws its own)."""
    quantization: str | None = None
    """Quantized projection weights (engine.loader.quantize): 'int8' (weight-only, per
    output channel, made at load from any checkpoint) or 'gguf' (a GGUF file's Q8_0/Q4_0/
    Q4_1 blocks kept as they are), 'f32' (float32 weights stored by output channel for the
    CPU kernels: no precision change), 'fp8' (e4m3 per output channel; W8A8 on the GPU),
    'int4' (weight-only, group-wise scales and zero points); 'auto':
    gguf for a .gguf file, f32 for any other checkpoint; None keeps the weights as loaded."""

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy", "orbax"):
            raise ValueError(f"load_format must be auto, dummy or orbax, got "
                             f"{self.load_format!r}")
        if self.quantization not in (None, "int8", "gguf", "f32", "fp8", "int4", "auto"):
            raise ValueError(f"quantization must be int8, gguf, f32, fp8, int4 or auto, got "
                             f"{self.quantization!r}")
        if not isinstance(self.fuse_qkv, bool):
            raise ValueError(f"fuse_qkv must be true or false, got {self.fuse_qkv!r}")
        if not isinstance(self.fuse_gate_up, bool):
            raise ValueError(f"fuse_gate_up must be true or false, got {self.fuse_gate_up!r}")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    name: str = "auto"
    """Registered backend name ('cpu', ...) or 'auto'."""
    scan_layers: bool | None = None
    """lax.scan over stacked layers (constant compile time) or an unrolled loop; None: the
    backend's default."""
    options: tuple[tuple[str, Any], ...] = ()
    """Backend-specific settings from the YAML file (kernel block sizes, ...)."""
    interpret: bool | str | None = None
    """Run the backend's kernels in the Pallas interpreter on the CPU (slow; for tests and
    porting): true, or a backend's own mode (tpu: 'tpu', 'hlo'). None or false: run on the
    backend's hardware, which must be present. Reaches the backend as its option
    `interpret` (EngineConfig.build puts it in `options`)."""
    npu_device: str | None = None
    """The npu backend's torch device: 'npu' (Ascend, through torch_npu) or 'cpu' (CPU torch
    with the reference ops, no NPU needed); None: 'npu'. Other backends ignore it. Reaches the
    backend as its option `npu_device` (EngineConfig.build puts it in `options`)."""

    def __post_init__(self) -> None:
        if self.npu_device not in (None, "npu", "cpu"):
            raise ValueError(f"npu_device must be npu or cpu, got {self.npu_device!r}")


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    page_size: int = 16
    """Tokens per KV page (1 and up)."""
    max_total_tokens: int | None = None
    """KV pool size in tokens; None: sized from the backend's free memory."""
    kv_memory_fraction: float = 0.9
    """Share of the free memory (after weights) given to the KV pool when it is sized."""
    kv_cache_dtype: str = "auto"
    """'auto': the KV cache in the model's dtype; 'fp8': float8_e4m3fn with a per-tensor
    scale of 1 (K/V stored as they are, clipped to +-448; no calibration, as vLLM does
    without one), read upcast by the attention kernels: twice the tokens per byte."""

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"{self.max_total_tokens=} must hold at least one page "
                             f"({self.page_size=})")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got "
                             f"{self.kv_cache_dtype!r}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got "
                             f"{self.kv_memory_fraction}")


@dataclasses.dataclass(frozen=True)
class SchedulingOptions:
    max_running_requests: int = 64
    chunked_prefill_size: int = 512
    """Token budget of one step (prompt chunks and decodes together)."""
    schedule_policy: str = "fcfs"
    """'fcfs' or 'lpm' (longest prefix match first)."""
    disable_radix_cache: bool = False
    overlap_schedule: bool = False
    """Schedule and prepare step N+1 while the device runs step N (sampled tokens stay on
    the device until the host needs them); on in the accelerator presets."""
    warmup_decode_len: int = 0
    """At start-up, compile (by running it on idle rows) the decode-only step for every
    sequence bucket and every page bucket up to this context length, greedy and sampling,
    so that decoding meets no compilation later; progress is logged. 0: programs compile
    when first needed. Either way they land in the persistent cache (a second start loads
    them). Single-process only."""
    warmup_prompt_steps: bool = False
    """With warmup_decode_len: also compile the steps with prompt tokens that take the
    largest sequence bucket (token buckets of Buckets.wide_tokens and up: the prefill chunks
    of a loaded server), for the same page buckets. Smaller steps with prompt tokens still
    compile when first needed."""
    warmup_threads: int = 0
    """Threads that compile warm-up programs at once (each is traced and lowered in turn,
    then compiled on a thread while the next is lowered); 0: one per CPU core."""
    warmup_executables: bool = False
    """Warm-up stores each step program it compiles serialized ($ENGINE_CACHE_DIR/programs,
    under a digest of its sources, versions, devices and argument types), and a later start
    loads it from there without tracing or lowering the model (engine.program_store). For a
    GPU or TPU: jaxlib's CPU executables can be stored without a kernel (engine.compile's
    enable_persistent_cache), so on the CPU it is for tests that load in the same process."""

    page_buckets: str = "pow2"
    """Page-table widths of the step programs: 'pow2', powers of two up to the longest
    sequence (a step takes the smallest that holds its longest sequence: the CPU's attention
    gathers every page of the width); 'max', one width for every step (kernels that read
    only each sequence's own pages lose nothing, and the program grid shrinks by the number
    of pow2 widths)."""
    wide_tokens: int = 2048
    """Steps with prompt tokens whose token bucket is this or more pad their sequences to
    the largest sequence bucket: one program per token bucket instead of one per token and
    sequence bucket (engine.compile.WIDE_TOKENS)."""

    def __post_init__(self) -> None:
        if self.page_buckets not in ("pow2", "max"):
            raise ValueError(f"page_buckets must be pow2 or max, got {self.page_buckets!r}")
        if self.wide_tokens < 16:
            raise ValueError(f"wide_tokens must be >= 16 (the smallest token bucket), got "
                             f"{self.wide_tokens}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.chunked_prefill_size < self.max_running_requests:
            raise ValueError(f"{self.chunked_prefill_size=} must be at least "
                             f"{self.max_running_requests=} (one decode token each)")
        if self.warmup_decode_len < 0:
            raise ValueError(f"warmup_decode_len must be >= 0, got {self.warmup_decode_len}")
        if self.warmup_threads < 0:
            raise ValueError(f"warmup_threads must be >= 0 (0: one per CPU core), got "
                             f"{self.warmup_threads}")
        if not isinstance(self.warmup_executables, bool):
            raise ValueError(f"warmup_executables must be true or false, got "
                             f"{self.warmup_executables!r}")
        if not isinstance(self.warmup_prompt_steps, bool):
            raise ValueError(f"warmup_prompt_steps must be true or false, got "
                             f"{self.warmup_prompt_steps!r}")
        if self.warmup_prompt_steps and not self.warmup_decode_len:
            raise ValueError("warmup_prompt_steps needs warmup_decode_len (the context length "
                             "its page buckets go up to); for no warm-up at all, turn both "
                             "off (--warmup-decode-len 0 --no-warmup-prompt-steps)")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"schedule_policy must be fcfs or lpm, got {self.schedule_policy!r}")


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    tensor_parallel_size: int = 1
    """Devices one model is sharded over (the mesh axis "tp"): heads, MLP width and vocab."""
    expert_parallel: bool = False
    """MoE models: shard whole experts over the "tp" axis instead of each expert's width."""
    axis_rules: tuple[tuple[str, str | None], ...] = ()
    """Overrides of the logical axis -> mesh axis rules (engine.parallel.sharding)."""
    coordinator_address: str | None = None
    """host:port of process 0 for multi-host (jax.distributed); None: one process."""
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"need 0 <= process_id < num_processes, got {self.process_id=}, "
                             f"{self.num_processes=}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError(f"{self.num_processes=} needs a coordinator_address (host:port "
                             f"of process 0)")
        if isinstance(self.axis_rules, dict):
            object.__setattr__(self, "axis_rules", tuple(sorted(self.axis_rules.items())))


SPECULATIVE_ALGORITHMS = ("ngram", "draft", "eagle")
SPECULATIVE_ALIASES = {"eagle3": "eagle"}


@dataclasses.dataclass(frozen=True)
class SpeculativeOptions:
    speculative_algorithm: str | None = None
    """Speculative decoding: 'ngram' (prompt lookup: drafts copied from the request's own
    prompt and output), 'draft' (a smaller model of the same tokenizer) or 'eagle' (alias
    'eagle3': an EAGLE-3 head over the target's features, engine.spec.eagle); None: off."""
    speculative_num_draft_tokens: int = 4
    """Draft tokens proposed per decode and step (k: a decode becomes a 1 + k token row)."""
    speculative_ngram_min: int = 1
    """ngram: the shortest suffix looked up (like vLLM's prompt_lookup_min)."""
    speculative_ngram_max: int = 4
    """ngram: the longest suffix looked up, tried first (like vLLM's prompt_lookup_max)."""
    speculative_draft_model: str | None = None
    """draft: the draft model (HF directory, .gguf file or alias), same tokenizer. eagle:
    the EAGLE-3 head's folder (config.json and safetensors; config.json alone under
    --load-format dummy)."""
    speculative_max_batch: int = 4
    """Speculate only while at most this many requests run: above it the step is bound by
    compute more than by reading the weights, and verifying drafts costs more than it saves
    (the CPU default: docs/benchmarks.md)."""
    speculative_adaptive: bool = True
    """Speculate only while it measures faster than plain (overlapped) steps: seconds a step
    of each kind and tokens a speculative step yields, averaged as they run, with a few steps
    of the other kind now and then (engine.spec.governor). False: always, up to
    speculative_max_batch."""

    def __post_init__(self) -> None:
        a = SPECULATIVE_ALIASES.get(self.speculative_algorithm, self.speculative_algorithm)
        object.__setattr__(self, "speculative_algorithm", a)
        if a is not None and a not in SPECULATIVE_ALGORITHMS:
            raise ValueError(f"speculative_algorithm must be one of "
                             f"{', '.join(SPECULATIVE_ALGORITHMS)}, got {a!r}")
        if self.speculative_num_draft_tokens < 1:
            raise ValueError(f"speculative_num_draft_tokens must be >= 1, got "
                             f"{self.speculative_num_draft_tokens}")
        if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ValueError(f"need 1 <= {self.speculative_ngram_min=} <= "
                             f"{self.speculative_ngram_max=}")
        if (a in ("draft", "eagle")) != (self.speculative_draft_model is not None):
            raise ValueError(f"speculative_draft_model={self.speculative_draft_model!r} goes "
                             f"with speculative_algorithm draft or eagle (got {a!r})")
        if self.speculative_max_batch < 1:
            raise ValueError(f"speculative_max_batch must be >= 1, got "
                             f"{self.speculative_max_batch}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: ModelOptions = ModelOptions()
    backend: BackendOptions = BackendOptions()
    cache: CacheOptions = CacheOptions()
    scheduler: SchedulingOptions = SchedulingOptions()
    parallel: ParallelOptions = ParallelOptions()
    speculative: SpeculativeOptions = SpeculativeOptions()

    @classmethod
    def build(cls, config_file: str | Path | None = None, **overrides: Any) -> EngineConfig:
        """Defaults < YAML file < overrides. Override keys are field names of any section
        (`page_size=...`), `backend=` for the backend name; None values are ignored."""
        sections: dict[str, dict[str, Any]] = {f.name: {} for f in dataclasses.fields(cls)}
        if config_file is not None:
            for section, values in load_yaml(config_file).items():
                if section in NOT_ENGINE_SECTIONS:
                    continue
                if section not in sections or not isinstance(values, dict):
                    raise ValueError(f"{config_file}: unknown section {section!r}; "
                                     f"expected one of {', '.join(sections)}")
                sections[section].update(values)
        if "backend" in overrides:
            overrides["name"] = overrides.pop("backend")
        owner = {f.name: section for section, typ in _SECTION_TYPES.items()
                 for f in dataclasses.fields(typ)}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in owner:
                raise TypeError(f"unknown engine option {key!r}")
            sections[owner[key]][key] = value
        backend = sections["backend"]
        extra = {k: backend.pop(k) for k in list(backend)
                 if k not in {f.name for f in dataclasses.fields(BackendOptions)}}
        for key in ("interpret", "npu_device"):  # typed fields that reach the backend
            if backend.get(key) is not None:   # as options
                extra[key] = backend[key]
        backend["options"] = tuple(sorted({**dict(backend.get("options", ())), **extra}.items()))
        for name, vals in sections.items():  # a typo is a one-line error, not a traceback
            known = {f.name for f in dataclasses.fields(_SECTION_TYPES[name])}
            unknown = sorted(set(vals) - known)
            if unknown:
                where = f"{config_file}: " if config_file is not None else ""
                raise ValueError(f"{where}unknown key(s) {', '.join(map(repr, unknown))} in "
                                 f"section {name!r}; expected: {', '.join(sorted(known))}")
        return cls(**{name: _SECTION_TYPES[name](**vals) for name, vals in sections.items()})


_SECTION_TYPES = {"model": ModelOptions, "backend": BackendOptions, "cache": CacheOptions,
                  "scheduler": SchedulingOptions, "parallel": ParallelOptions,
                  "speculative": SpeculativeOptions}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file by path, or a preset name from configs/ ('cpu' -> configs/cpu.yaml)."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    return data
