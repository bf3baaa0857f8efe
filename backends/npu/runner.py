"""The NPU backend's model runner: ModelRunner's batching, buckets and sampling rows, with
the step (and the grammar-constrained split step) executed by the torch executor.

Weights become torch tensors once, on the chosen device, replacing the JAX arrays in the
params dict in place (so the host does not hold both). The KV cache is torch tensors in
the backend's layout [pages + 1, page, Hkv, D]. The step's sampler outputs are read back
to numpy as soon as it returns (no overlap of host and device work yet).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import torch

from backends.npu.dtypes import to_torch, torch_dtype
from backends.npu.executor import TorchJit, tree_to_numpy
from engine.backend import Backend
from engine.compile import Buckets, CompileCounter
from engine.model.config import ModelConfig
from engine.runner import ModelRunner, make_split_step, make_step


def params_to_torch(params: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every array of the params tree as a torch tensor on `device`, converted in place in
    the dicts and lists that hold them (each JAX array is dropped once converted)."""
    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            for k in list(node):
                node[k] = convert(node[k])
            return node
        if isinstance(node, list):
            for i in range(len(node)):
                node[i] = convert(node[i])
            return node
        return node if isinstance(node, torch.Tensor) else to_torch(node, device)
    return convert(params)


class _TorchStep:
    """Called as the runner's jitted step; returns (sampler output as numpy, KV cache,
    next tokens as a torch tensor)."""

    def __init__(self, fn: Callable[..., Any], backend: Any, numpy_out: tuple[int, ...],
                 static_argnums: tuple[int, ...] = ()):
        """`numpy_out`: which outputs of a tuple are read back; a non-tuple output always is."""
        self.jit = TorchJit(fn, backend.ops, backend.torch_device, static_argnums)
        self.numpy_out = numpy_out

    def __call__(self, *args: Any, **static: Any) -> Any:
        outs = self.jit(*args, **static)
        avals = self.jit.out_avals(*args, **static)
        if not isinstance(outs, tuple):
            return tree_to_numpy(outs, avals)
        return tuple(tree_to_numpy(o, a) if i in self.numpy_out else o
                     for i, (o, a) in enumerate(zip(outs, avals, strict=True)))


class NpuModelRunner(ModelRunner):
    def __init__(
        self, cfg: ModelConfig, params: dict[str, Any], backend: Backend, *, page_size: int,
        num_pages: int, max_num_tokens: int, max_num_seqs: int, max_model_len: int,
        kv_dtype: jnp.dtype, eos_token_ids: tuple[int, ...] = (),
        kv_place: Callable[[tuple, tuple], Any] | None = None, buckets: Buckets | None = None,
    ) -> None:
        # ModelRunner's fields, set here: its __init__ would allocate the KV cache in JAX.
        dev = backend.torch_device  # type: ignore[attr-defined]
        self.eos_token_ids = eos_token_ids
        self.cfg, self.backend = cfg, backend
        self.params = params_to_torch(params, dev)
        self.page_size, self.num_pages = page_size, num_pages
        shape = backend.kv_cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        dt = torch_dtype(kv_dtype)
        if isinstance(self.params["layers"], dict):  # stacked layers (scan)
            self.kv = tuple(torch.zeros((cfg.num_layers, *shape), dtype=dt, device=dev)
                            for _ in range(2))
        else:
            self.kv = [tuple(torch.zeros(shape, dtype=dt, device=dev) for _ in range(2))
                       for _ in range(cfg.num_layers)]
        max_pages = -(-max_model_len // page_size)
        self.buckets = buckets or Buckets.make(max_num_tokens, max_num_seqs, max_pages,
                                               min_seqs=backend.capabilities.min_seq_bucket)
        step = make_step(cfg, backend, self.buckets.seqs[-1])  # the JAX backends' step
        self._step = _TorchStep(step, backend, numpy_out=(0,), static_argnums=(8,))
        self._no_prev = torch.zeros(self.buckets.seqs[-1], dtype=torch.int32, device=dev)
        self.compiled_shapes: set[tuple] = set()
        self.step_log = None
        self._last_done = 0.0
        self.warmed_up = False
        self.serving_compiles = 0  # stays 0: nothing is compiled by XLA here
        self._compiles = CompileCounter()
        self.capture, self.hidden = (), None  # no EAGLE-3 state pool on this backend
        self.loaded_programs = {}  # no stored XLA programs: the torch executor runs the step
        self.released_params = None

    def _constrained_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._split is None:
            fwd, masked_sample = make_split_step(self.cfg, self.backend)
            self._split = (_TorchStep(fwd, self.backend, ()),
                           _TorchStep(masked_sample, self.backend, (), (3,)))
        return super()._constrained_step(*args, **kwargs)
