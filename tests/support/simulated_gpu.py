"""Device moves that really copy, on a CPU: how the GPU path runs, for tests.

On a CPU `tensor.to("cpu")` returns the tensor itself and `Module.to("cpu")` changes nothing, so
bugs that only a real move shows (a Parameter built under inference mode getting copied data
outside it) never appear. Inside `copying_moves()`:
- every `Tensor.to(...)` that names a device returns a new tensor (a copy), as a move to another
  device does; `Module.to`, ComfyUI's model loading and casting all go through it;
- the device "cuda" (any index) is simulated by the CPU, so code can be told to run on "cuda"
  and compares devices as it would on a GPU machine (a module on "cpu" differs from "cuda").
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SIMULATED = "cuda"


def _real_device(device):
    if device is not None and torch.device(device).type == SIMULATED:
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def copying_moves() -> Iterator[None]:
    """See the module docstring. Not thread-safe to enter twice; restored on exit."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        copy = kwargs.pop("copy", False)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is None:          # a dtype conversion only: unchanged behaviour
            return original(self, *args, copy=copy, **kwargs)
        options = {"dtype": dtype, "non_blocking": non_blocking, "copy": True}
        if memory_format is not None:
            options["memory_format"] = memory_format
        return original(self, _real_device(device), **options)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original
