"""The CUDA backend: the shared GPU backend (backends/gpu/backend.py) with the kernels' CUDA
tuning, measured on an H100/H200 (the defaults in backends/gpu/kernels)."""

from __future__ import annotations

from backends.gpu.backend import TritonBackend


class CudaBackend(TritonBackend):
    name = "cuda"
