"""JAX dtypes as torch dtypes. uint32 (the PRNG's bits) is held in int64 (values in
[0, 2**32)), as is a threefry key's data ([..., 2]); results of that type are masked."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_TORCH = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
    "uint32": torch.int64,  # widened: see the module docstring
}


def is_key(dtype: Any) -> bool:
    return "key<" in str(dtype)


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype that holds values of a JAX dtype (a PRNG key: its uint32 data)."""
    name = "uint32" if is_key(dtype) else np.dtype(dtype).name
    if name not in _TORCH:
        raise NotImplementedError(f"the NPU executor has no torch type for JAX dtype {name}")
    return _TORCH[name]


def is_wide_uint32(dtype: Any) -> bool:
    return is_key(dtype) or np.dtype(dtype).name == "uint32"


def to_torch(x: Any, device: torch.device | str) -> torch.Tensor:
    """A numpy / JAX array or scalar as a torch tensor of its torch_dtype on `device`."""
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":  # numpy has no bfloat16 torch.from_numpy understands
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    elif a.dtype.name == "uint32":
        t = torch.from_numpy(a.astype(np.int64))
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    return t.to(device)


def to_numpy(t: torch.Tensor, dtype: Any) -> np.ndarray:
    """A torch tensor back as numpy in JAX dtype `dtype` (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu()
    name = np.dtype(dtype).name
    if name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.dtype(dtype))
    if name == "uint32":
        return t.numpy().astype(np.uint32)
    return t.numpy()
