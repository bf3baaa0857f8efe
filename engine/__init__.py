"""A JAX/XLA LLM inference and serving engine with pluggable hardware backends."""

import engine.startup  # noqa: F401, I001  first: its import is the start-up clock's zero
from engine.envs import default_gpu_memory_fraction
from engine.sampling_params import SamplingParams

default_gpu_memory_fraction()  # before anything starts JAX's GPU client

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in jax and the model; import it only when used.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
