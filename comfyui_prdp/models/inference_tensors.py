"""Modules built under `torch.inference_mode()` made safe to use outside it.

ComfyUI runs every node under inference mode, so a module a node builds with plain constructors
holds inference tensors. Outside inference mode (the training job's thread), `Module.to(device)`
then wraps the moved tensors in the old inference-mode Parameter objects: on a GPU, where the move
really copies, the next forward raises "Inference tensors do not track version counter" (on a
CPU the move is a no-op and nothing shows). `make_ordinary` replaces every such parameter or
buffer by an ordinary copy, before or after the damage, whatever mode the caller is in.
"""
from __future__ import annotations

from typing import Iterator

import torch


def is_inference_like(tensor: torch.Tensor) -> bool:
    """An inference tensor, or a tensor that lost its version counter to one (a Parameter made in
    inference mode whose data was swapped by a move outside it): unusable outside inference mode."""
    if tensor.is_inference():
        return True
    try:
        tensor._version
    except RuntimeError:
        return True
    return False


def inference_like_tensors(module: torch.nn.Module) -> Iterator[str]:
    """Qualified names of the module's parameters and buffers that are inference-like."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if is_inference_like(tensor):
            yield name


def make_ordinary(module: torch.nn.Module) -> int:
    """Replace every inference-like parameter and buffer of `module` by an ordinary copy on the
    same device (requires_grad kept). Returns how many were replaced; one tensor is copied at a
    time, so the extra memory is that of the largest one."""
    replaced = 0
    for sub in module.modules():
        for key, parameter in list(sub._parameters.items()):
            if parameter is not None and is_inference_like(parameter):
                sub._parameters[key] = torch.nn.Parameter(ordinary(parameter), requires_grad=parameter.requires_grad)
                replaced += 1
        for key, buffer in list(sub._buffers.items()):
            if buffer is not None and is_inference_like(buffer):
                sub._buffers[key] = ordinary(buffer)
                replaced += 1
    return replaced


def ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary, detached copy of `tensor` on its device, whatever mode made it and whatever
    mode the caller is in (works on inference-like tensors too)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.empty_like(tensor.data).copy_(tensor.data)


def move_ordinary(module: torch.nn.Module, device) -> torch.nn.Module:
    """`module.to(device)` that works whatever mode the module was built in and whatever mode
    the caller is in: inference tensors are made ordinary first, and the move runs outside
    inference mode (so it never turns ordinary tensors into inference ones)."""
    with torch.inference_mode(False):
        make_ordinary(module)
        return module.to(device)
