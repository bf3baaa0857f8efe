"""Where the NPU backend's torch runs: 'npu' (an Ascend NPU through torch_npu) or 'cpu'
(CPU torch with the reference ops: for tests, and for porting without an NPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from backends.npu.kernels import npu_ops, reference_ops

DEVICES = ("npu", "cpu")

INSTALL_HINT = ("the NPU backend needs torch_npu and Ascend's CANN libraries: install CANN, "
                "then `pip install -e '.[npu]'` (torch-npu matching torch 2.13.0); to run the "
                "same path on CPU torch without an NPU, pass --npu-device cpu")


def resolve(device: str) -> tuple[torch.device, SimpleNamespace]:
    """The torch device and the fused-op set for `device`. torch_npu is imported only for
    'npu' (its import fails without the CANN libraries)."""
    if device not in DEVICES:
        raise ValueError(f"npu_device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return torch.device("cpu"), reference_ops()
    try:
        ops = npu_ops()
    except (ImportError, OSError, RuntimeError) as e:
        raise ValueError(f"{INSTALL_HINT} (import torch_npu failed: {e})") from None
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        raise ValueError(f"torch_npu is installed but sees no NPU; {INSTALL_HINT}")
    return torch.device("npu:0"), ops
