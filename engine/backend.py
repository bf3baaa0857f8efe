"""The Backend contract and its registry.

A backend says what it can do (a frozen capabilities record with conservative defaults),
how much memory there is, how the KV cache is laid out, and supplies the attention kernel
for a mixed ragged batch. Backends are registered by name and imported lazily, so CUDA
code is never imported on a TPU host. A backend without JAX (Ascend NPU through torch)
sets `own_model_runner` and supplies its runner instead.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from engine.attention import AttentionMetadata, write_kv
from engine.model.config import ModelConfig
from engine.model.llama import add_rms_norm
from engine.model.quant import QuantizedWeight, reference_linear


@dataclasses.dataclass(frozen=True)
class Capabilities:
    platform: str = "cpu"
    """The jax platform the backend runs on ('cpu', 'gpu', 'tpu'), or 'torch'."""
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    default_dtype: str = "float32"
    page_sizes: tuple[int, ...] = ()
    """Page sizes the attention kernel supports; empty means any."""
    scan_layers: bool = True
    """Default for the model's layer loop: lax.scan (constant compile time) or unrolled."""
    own_model_runner: bool = False
    """True for backends that do not run the JAX model (they supply a runner)."""
    min_seq_bucket: int = 4
    """Smallest sequence bucket. A kernel whose decode step wants one query row per token
    (T == S, no pad or slice around it) sets the smallest token bucket, 16."""
    min_token_bucket: int = 16
    """Smallest token bucket of a step (a power of two up to 16). The CPU backend lowers it
    with its option min_token_bucket, so that a batch-1 decode step computes one row."""
    fp8_kv: bool = False
    """The attention reads an fp8 KV cache (upcast where loaded): --kv-cache-dtype fp8, in the
    backend's `fp8_dtype`."""
    spmd_attention: bool = True
    """The attention is plain JAX that XLA's SPMD partitioner can shard. False for custom
    kernels: under tensor parallelism they run per device over their heads (shard_map)."""


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    free_bytes: int


def device_memory(devices: list[jax.Device]) -> MemoryInfo:
    """XLA's allocator limit and free bytes of the device with the least free memory."""
    infos = []
    for d in devices:
        stats = d.memory_stats() or {}
        limit = int(stats.get("bytes_limit", 0))
        infos.append(MemoryInfo(limit, limit - int(stats.get("bytes_in_use", 0))))
    return min(infos, key=lambda m: m.free_bytes)


class Backend(abc.ABC):
    name: str = "base"
    capabilities: Capabilities = Capabilities()
    hardware: str = ""
    """The hardware as a user names it ('TPU', 'NVIDIA GPU'), for the no-device error."""
    jax_plugin: str = ""
    """The pip requirement that gives jax this hardware ('jax[tpu]'), for the same error."""
    can_interpret: bool = False
    """The kernels also run in the Pallas interpreter on the CPU (backend option interpret,
    CLI --interpret): slow, for tests and porting."""
    fp8_dtype: Any = jnp.dtype(jnp.float8_e4m3fn)
    """The hardware's e4m3 type: of an fp8 KV cache, and of fp8 weights once prepare_weights
    has run. OCP float8_e4m3fn everywhere but where the ROCm backend runs MI300's
    float8_e4m3fnuz (its option fp8_type)."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.mesh: Any = None
        """The device mesh when the model is sharded (set by the builder), else None."""
        self.mesh_rules: dict[str, str | None] = {}
        """Logical axis -> mesh axis rules the weights and KV cache were placed by."""
        self.compiler_options: dict[str, Any] = {}
        """XLA options of every program over the model's weights (jax.jit's
        compiler_options; see `jit`), set by the builder from the loaded weights
        (options_for)."""

    def jit(self, fn: Any, **kwargs: Any) -> Any:
        """jax.jit(fn, **kwargs) compiled with this backend's compiler_options: how every
        program over the model's weights (a step, a draft, a verify) is made."""
        return jax.jit(fn, compiler_options=dict(self.compiler_options) or None, **kwargs)

    def devices(self) -> list[jax.Device]:
        """The platform's devices; ValueError, saying what jax does see, when it has none."""
        try:
            return jax.devices(self.capabilities.platform)
        except RuntimeError:
            raise ValueError(self.no_device_message()) from None

    def no_device_message(self) -> str:
        seen = collections.Counter(d.platform for d in jax.devices())
        what = self.hardware or self.capabilities.platform
        msg = (f"backend {self.name!r}: no {what} found; jax sees only "
               f"{', '.join(f'{n} {p} device(s)' for p, n in seen.items())}.")
        if self.jax_plugin:
            msg += (f" Where there is one, install jax with its plugin: "
                    f"pip install -U '{self.jax_plugin}'.")
        if self.can_interpret:
            msg += (" To run this backend's kernels in the Pallas interpreter on the CPU "
                    "instead (slow; for tests and porting), pass --interpret (YAML: "
                    "backend: {interpret: true}).")
        return msg

    def model_devices(self) -> list[jax.Device]:
        """This process's devices that hold the model: the mesh's, or its first device."""
        devices = self.devices() if self.mesh is None else list(self.mesh.devices.flat)
        local = [d for d in devices if d.process_index == jax.process_index()]
        return local if self.mesh is not None else local[:1]

    def options_for(self, params: Any) -> dict[str, Any]:
        """The XLA options programs over these (prepared) weights compile with. Default:
        none, XLA's own."""
        return {}

    def prepare_weights(self, params: Any) -> Any:
        """The loaded parameter tree (fused, quantized: engine.model.quant's shared formats)
        as this backend runs it; called once at load and on every weight update, before the
        arrays are committed to their shardings. Default: as it is."""
        return params

    @abc.abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Memory available to weights, activations and the KV cache on one device (the
        fullest of model_devices() where the backend has device memory)."""

    def kv_cache_shape(
        self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's K (and V) cache. Default: [pages, page, Hkv, D]."""
        return (num_pages, page_size, num_kv_heads, head_dim)

    def kv_cache_axes(self) -> tuple[str, ...]:
        """Logical names of kv_cache_shape's axes (engine.model.axes), for sharding."""
        return ("pages", "page", "kv_heads", "head_dim")

    def allocate_kv(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any,
                    *, scan: bool, place: Callable[[tuple, tuple], Any] | None = None) -> Any:
        """Zeroed K and V caches: per layer [(K, V), ...], or stacked (K [L,...], V [L,...]).

        `place(shape, logical_axes)` gives the sharding of each array (None: default device);
        the caches are made in place, never whole on one device first."""
        shape = self.kv_cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        axes = self.kv_cache_axes()
        if scan:
            shape, axes = (cfg.num_layers, *shape), ("layers", *axes)
        device = place(shape, axes) if place is not None else None

        def zeros() -> jax.Array:
            return jnp.zeros(shape, dtype, device=device)

        if scan:
            return (zeros(), zeros())
        return [(zeros(), zeros()) for _ in range(cfg.num_layers)]

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slots: jax.Array, layer: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        """Write this step's K/V [T, Hkv, D] at flat slots [T] into caches of kv_cache_shape's
        layout. Default: engine.attention.write_kv for [pages, page, Hkv, D]."""
        return write_kv(k_cache, v_cache, k, v, slots, layer)

    @abc.abstractmethod
    def attention(
        self,
        q: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        md: AttentionMetadata,
        *,
        scale: float,
        layer: jax.Array | None = None,
    ) -> jax.Array:
        """q [T, Hq, D] over the paged cache (this step's K/V already written) -> [T, Hq, D].

        The caches are one layer's, or (under scan) every layer's stacked, with `layer` the
        index of the one to read."""

    def attention_fn(self) -> Callable[..., jax.Array]:
        """`attention` as the model should call it: per device over its heads when the model
        is sharded and the kernel is opaque to the SPMD partitioner."""
        if self.mesh is None or self.capabilities.spmd_attention:
            return self.attention
        from engine.parallel.sharding import shard_heads

        return shard_heads(self.attention, self.mesh, self.kv_cache_axes(), self.mesh_rules)

    def linear(self, x: jax.Array, w: QuantizedWeight) -> jax.Array:
        """x [T, *in_shape] @ a quantized weight -> [T, *out_shape] (engine.model.quant).
        Default: the plain-JAX reference (dequantize, then one float32 dot)."""
        return reference_linear(x, w)

    def add_rms_norm(self, x: jax.Array, y: jax.Array, w: jax.Array, eps: float
                     ) -> tuple[jax.Array, jax.Array]:
        """A residual add and the norm after it: x, y [T, E], w [E] -> (rms_norm(x + y) * w,
        x + y). Default: the model's plain JAX (engine.model.llama.add_rms_norm)."""
        return add_rms_norm(x, y, w, eps)

    def compile_options(self) -> dict[str, Any]:
        return {}

    def runner_class(self) -> type:
        """With `own_model_runner`: the runner class, built with ModelRunner's arguments."""
        raise NotImplementedError(f"backend {self.name!r} does not supply a model runner")


_REGISTRY: dict[str, str] = {
    "cpu": "backends.cpu.backend:CpuBackend",
    "tpu": "backends.tpu.backend:TpuBackend",
    "cuda": "backends.cuda.backend:CudaBackend",
    "rocm": "backends.rocm.backend:RocmBackend",
    "npu": "backends.npu.backend:NpuBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register `module:Class` under `name`; the module is imported only when chosen."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


_PLATFORM_TO_BACKEND = {"gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu"}


def detect_backend() -> str:
    """'auto': the backend for jax's default platform when one is registered, else cpu."""
    name = _PLATFORM_TO_BACKEND.get(jax.default_backend(), "cpu")
    if name == "cuda" and "rocm" in jax.devices()[0].client.platform_version.lower():
        name = "rocm"  # jax names both GPU platforms "gpu"; the client says which
    return name if name in _REGISTRY else "cpu"


def get_backend(name: str = "auto", options: dict[str, Any] | None = None) -> Backend:
    if name == "auto":
        name = detect_backend()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(options)
