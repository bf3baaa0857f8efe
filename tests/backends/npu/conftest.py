"""One torch thread for the NPU backend's CPU-torch tests: on a shared 2-core host torch's
OpenMP workers spin against the other processes (at load 16, six SmolLM2 steps took 90 s
with two threads, 14 s with one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
