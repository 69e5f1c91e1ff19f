"""The LoRA attached to ComfyUI's weights: the LoRA targets, the weight wrappers (fresh
tensors, identity wrappers) and the one switch that turns every adapter off."""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: LoRA targets per transformer architecture (globs on ComfyUI's module names), used when the
#: default UNet targets match nothing: Flux/Chroma (fused qkv, attention out, single-block
#: linear1/linear2), SD3's MMDiT (joint blocks' image and text attention), Lumina2/Z-Image
#: (NextDiT attention). Models with to_q/to_k/to_v/to_out (Qwen-Image, ...) match the default.
ARCHITECTURE_TARGETS = (
    ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
     "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1", "single_blocks.*.linear2"),
    ("joint_blocks.*.x_block.attn.qkv", "joint_blocks.*.x_block.attn.proj",
     "joint_blocks.*.context_block.attn.qkv", "joint_blocks.*.context_block.attn.proj"),
    ("layers.*.attention.qkv", "layers.*.attention.out"),
)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors live in the same storage (True when it cannot be told)."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return True


def fresh(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`result`, copied when it shares storage with `source` (a buffer ComfyUI may reuse)."""
    return result.clone() if shares_storage(result, source) else result


def identity_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight wrapper that changes nothing (its presence makes ComfyUI copy the weight).
    Detached: the base weights never receive gradients, whatever their requires_grad says.
    A copy: the input may be a reused cast buffer (dynamic VRAM, low-VRAM offload)."""
    return weight.detach().clone()


class AdapterSwitch:
    """Shared on/off state of all adapters of one backend."""

    def __init__(self) -> None:
        self.enabled = True


class SwitchableAdapter(torch.nn.Module):
    """A `comfy.weight_adapter` training adapter behind an on/off switch.

    ComfyUI calls it as `adapter(weight)` on every forward; `move_to` lets ComfyUI move the
    factors with the model (lowvram, offload).
    """

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weight = weight.detach()     # gradients go to the LoRA factors only
        return fresh(self.adapter(weight) if self.switch.enabled else weight, weight)

    def move_to(self, device=None) -> int:
        """ComfyUI moves the factors with the model, sometimes from code running under
        inference mode (encoding, decoding): the move runs outside it, so the trained factors
        never become inference tensors (which the optimizer could not update)."""
        if device is not None:
            with torch.inference_mode(False):
                self.to(device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def is_target_module(name: str, targets: Sequence[str]) -> bool:
    """Whether module `name` (ComfyUI's, relative to diffusion_model) is a LoRA target: a glob
    target (with `*`, e.g. `double_blocks.*.img_attn.qkv`) matches the whole name; a plain one
    (`to_q`) is a name suffix inside transformer blocks, e.g. `...transformer_blocks.0.attn1.to_q`."""
    for target in targets:
        if "*" in target or "?" in target:
            if fnmatch.fnmatchcase(name, target):
                return True
        elif ".transformer_blocks." in f".{name}" and name.endswith("." + target):
            return True
    return False


def resolve_targets(module_names: Sequence[str], targets: Sequence[str]) -> tuple:
    """The targets to use: `targets` as given, except that the default UNet targets on a model
    without such modules become its architecture's targets (ARCHITECTURE_TARGETS)."""
    targets = tuple(targets)
    if targets != DEFAULT_TARGETS or any(is_target_module(n, targets) for n in module_names):
        return targets
    for candidates in ARCHITECTURE_TARGETS:
        if any(is_target_module(n, candidates) for n in module_names):
            return candidates
    return targets
