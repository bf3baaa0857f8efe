"""KV pool sizing: free memory after the weights and the step's measured activation peak."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from backends.cpu.backend import CpuBackend
from engine.backend import MemoryInfo, device_memory
from engine.builder import activation_peak, kv_pages
from engine.config import EngineConfig
from engine.model.config import ModelConfig
from engine.model.weights import random_params

CFG = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=256)
PER_PAGE = 2 * CFG.num_layers * 16 * CFG.num_kv_heads * CFG.head_dim * 2  # bf16, page 16


class FixedMemory(CpuBackend):
    def __init__(self, free: int) -> None:
        super().__init__()
        self.free = free

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total_bytes=2 * self.free, free_bytes=self.free)


def test_pool_takes_the_fraction_left_after_activations():
    config = EngineConfig.build(kv_memory_fraction=0.5)
    free, peak = 1000 * PER_PAGE, 200 * PER_PAGE
    assert kv_pages(config, CFG, FixedMemory(free), 2, activation_bytes=peak) == 400
    # KV heads split over 2 devices: each page costs each device half as much.
    assert kv_pages(config, CFG, FixedMemory(free), 2, shards=2, activation_bytes=peak) == 800


def test_no_room_left_is_a_clear_error():
    config = EngineConfig.build()
    with pytest.raises(ValueError, match="no memory left for a KV cache"):
        kv_pages(config, CFG, FixedMemory(100 * PER_PAGE), 2, activation_bytes=100 * PER_PAGE)


def test_explicit_pool_size_wins():
    config = EngineConfig.build(max_total_tokens=1000, page_size=16)
    assert kv_pages(config, CFG, FixedMemory(10**12), 2, activation_bytes=10**15) == 63


def test_activation_peak_is_read_from_the_compiled_step(tmp_path, monkeypatch):
    """More tokens per step need more scratch: the probe compiles the largest bucket."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))  # nothing remembered yet
    params = random_params(CFG, jnp.float32, scan=False)
    peaks = [activation_peak(EngineConfig.build(chunked_prefill_size=n, max_running_requests=4),
                             CFG, params, CpuBackend(), jnp.dtype(jnp.float32), False, None)
             for n in (32, 512)]
    # At least the MLP intermediate [T, F] in float32 for the 512-token step.
    assert peaks[1] > max(peaks[0], 512 * CFG.intermediate_size * 4)


class FakeDevice:
    def __init__(self, limit: int, in_use: int) -> None:
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self) -> dict:
        return self.stats


def test_the_fullest_model_device_sizes_the_pool():
    """Under tensor parallelism every device holds its share of each page: the device with
    the least free memory decides how many pages fit."""
    info = device_memory([FakeDevice(100, 10), FakeDevice(100, 40), FakeDevice(90, 5)])
    assert (info.total_bytes, info.free_bytes) == (100, 60)
