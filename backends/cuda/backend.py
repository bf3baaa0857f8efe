"""The CUDA backend: the shared GPU backend (backends/gpu/backend.py) with the kernels' CUDA
tuning, measured on an H100/H200 (the defaults in backends/gpu/kernels). Without an NVIDIA
GPU it is an error that says so (ValueError), unless asked to interpret (option
interpret: true, CLI --interpret: the Pallas kernels in the interpreter on the CPU)."""

from __future__ import annotations

from typing import Any

from backends.gpu.backend import TritonBackend


class CudaBackend(TritonBackend):
    name = "cuda"
    hardware, jax_plugin, can_interpret = "NVIDIA GPU", "jax[cuda12]", True

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        if not self.interpret:
            self.devices()  # no GPU: the error, before anything is built
