"""Memory of ComfyUI training: the model's training clone (a deep copy where RAM allows), the
training compute dtype, and the reserve asked of ComfyUI for the training pass."""
from __future__ import annotations

from typing import Optional

import torch

#: a deep copy is made only while host RAM keeps this multiple of the model's size free
DEEP_COPY_RAM_FACTOR = 2.0


def deep_copy_fits(model) -> bool:
    """Whether host RAM has room for a second copy of the model's weights (with headroom): a
    deep copy reloads the checkpoint beside the user's model (Flux bf16: +24 GB)."""
    import comfy.model_management

    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    return free >= DEEP_COPY_RAM_FACTOR * model.model_size()


def training_clone(model):
    """A clone of the user's ModelPatcher to train on: a deep copy with its own (non-inference)
    weights where this ComfyUI and the model's loader support it and host RAM has room for it,
    as ComfyUI's own trainer clones; else an ordinary clone sharing the weights (inference
    tensors are never written: the wrappers copy them per forward, and every wrapper and
    forward patch is removed from the shared modules on release)."""
    import inspect
    import logging

    with torch.inference_mode(False):
        if "force_deepcopy" in inspect.signature(model.clone).parameters and \
                getattr(model, "cached_patcher_init", None) is not None:
            if deep_copy_fits(model):
                return model.clone(force_deepcopy=True)
            logging.getLogger(__name__).info(
                "PRDP: training on the loaded model's weights (no deep copy: host RAM has no room for a second "
                "copy of %.1f GB)", model.model_size() / 2 ** 30)
        return model.clone()


def training_compute_dtype(mixed_precision: Optional[str], device_type: str,
                           bf16_supported: bool) -> Optional[torch.dtype]:
    """The UNet compute dtype while training, or None to keep ComfyUI's choice.

    Only GPUs change: 'no' -> fp32; 'bf16' or 'fp16' -> bf16 where the GPU has it (its range
    needs no loss scaling), else fp16, which the trainer then trains with dynamic loss scaling
    (ComfyBackend.compute_dtype). On the CPU (or MPS) ComfyUI's choice stays.
    """
    if device_type != "cuda" or mixed_precision is None:
        return None
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if bf16_supported else torch.float16
    raise ValueError(f"mixed_precision={mixed_precision!r}: use 'no', 'fp16' or 'bf16'")


#: the training reserve for a first update phase, in units of ComfyUI's inference estimate
#: (activations kept for backward, the LoRA-merged weights of a block, gradients)
TRAINING_RESERVE_FACTOR = 3
#: what the reward phase asks ComfyUI to free, in units of the reward's weights (its activations
#: at the reward batch size on top)
REWARD_MEMORY_HEADROOM = 1.5
#: headroom over the measured peak of earlier update phases (allocator rounding, batch variation)
MEASURED_RESERVE_HEADROOM = 1.25


def training_reserve(inference_estimate: int, measured_peak: int) -> int:
    """Bytes ComfyUI keeps free beside the model while it trains: a multiple of its inference
    estimate until an update phase was measured, then at least that measured peak with headroom
    (ComfyUI's estimate is of inference: for Flux at 512 px 3x of it is ~0.7 GB, while backward
    is expected to need 2-3 GB; an estimate from reading the code, not measured on a GPU here)."""
    return max(TRAINING_RESERVE_FACTOR * int(inference_estimate), int(MEASURED_RESERVE_HEADROOM * measured_peak))
