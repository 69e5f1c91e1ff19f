"""Forward patches on ComfyUI's modules for training: block checkpointing, ComfyUI's training
mode, copies of saved tensors and of inference-mode parameters."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.utils.checkpoint

from ...models.inference_tensors import is_inference_like, ordinary

class ForwardPatches:
    """Instance-level `forward` replacements on modules that may be shared with the user's
    MODEL; `remove()` restores exactly what each module had before (its own `forward`
    attribute, or none)."""

    _MISSING = object()

    def __init__(self):
        self._patched: List[tuple] = []

    def _replace_forward(self, module: torch.nn.Module, forward) -> None:
        self._patched.append((module, module.__dict__.get("forward", self._MISSING)))
        module.forward = forward

    def remove(self) -> None:
        for module, previous in reversed(self._patched):
            if previous is self._MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()


class BlockCheckpointing(ForwardPatches):
    """Activation checkpointing of the UNet's blocks (each layer of input_blocks, middle_block,
    output_blocks): activations are recomputed in backward instead of kept, for memory.

    The UNet may be shared with the user's MODEL, so the patch is an instance-level `forward`
    that checkpoints only while `enabled` and gradients are on, and `remove()` restores
    exactly what was there before. `guard` wraps the recomputation in backward (which runs
    the model's ops again, so it may meet ComfyUI's interrupt).
    """

    #: block lists of transformer diffusion models (Flux/Chroma, SD3, Lumina2, Qwen-Image, ...)
    TRANSFORMER_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks", "layers", "transformer_blocks")

    def __init__(self, unet: torch.nn.Module, guard=contextlib.nullcontext):
        super().__init__()
        self.enabled = True
        self.guard = guard
        blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] + \
            list(getattr(unet, "output_blocks", []))
        for block in blocks:
            if block is None:
                continue
            for layer in block.children():
                self._patch(layer)
        for name in self.TRANSFORMER_BLOCK_LISTS:       # flow transformers: each block
            for layer in getattr(unet, name, None) or []:
                self._patch(layer, private_inputs=True)

    def _patch(self, layer: torch.nn.Module, private_inputs: bool = False) -> None:
        """private_inputs (transformer blocks): the block gets its own copies of its tensor
        inputs and a snapshot of dict options (transformer_options), because such blocks add
        residuals into their inputs in place (Flux: `txt += ...`) and ComfyUI updates the
        options dict between blocks; the recomputation in backward must see what forward saw."""
        original = layer.forward
        gate = self
        own = (lambda v: v.clone() if isinstance(v, torch.Tensor) else v)

        def guarded(*args, **kwargs):
            with gate.guard():
                if private_inputs:
                    args, kwargs = [own(a) for a in args], {k: own(v) for k, v in kwargs.items()}
                return original(*args, **kwargs)

        def forward(*args, **kwargs):
            if gate.enabled and torch.is_grad_enabled():
                if private_inputs:
                    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                return torch.utils.checkpoint.checkpoint(guarded, *args, use_reentrant=False, **kwargs)
            return original(*args, **kwargs)

        self._replace_forward(layer, forward)


@contextlib.contextmanager
def comfy_training_mode() -> Iterator[None]:
    """ComfyUI's `model_management.in_training` switched on (where this ComfyUI has it): models
    then use ops with autograd formulas (e.g. Flux's rope without the comfy_kitchen kernel).
    On for every model call of the backend, sampling included, so recorded and re-evaluated
    log-probs come from the same ops; restored afterwards."""
    import comfy.model_management

    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def saved_tensor_copies():
    """While active, autograd keeps copies of the tensors it saves for backward.

    Flow transformers add residuals in place (Flux's blocks: `txt += ...`, `x += ...`) onto
    tensors autograd already saved, which makes backward fail ("modified by an inplace
    operation"); a copy taken when saved is what the forward saw. Costs one copy of the saved
    activations (and weight copies) per forward with gradients on; sampling is not affected.
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


class InferenceParameterCopies(ForwardPatches):
    """Modules outside ComfyUI's ops (no weight_function, e.g. Flux's RMSNorm `scale`) read
    their parameters directly, and ComfyUI's weights may be inference tensors: loaded under
    inference mode, or given inference data when ComfyUI moves (evicts) the model from inside
    inference mode (the job's text encoding and decoding run there). Autograd cannot save those
    for backward (and a Parameter made in inference mode whose data a move outside it swapped
    has no version counter: inference_tensors.is_inference_like), so while gradients are on, such
    a module's forward runs on normal copies of whichever of its parameters are inference-like
    at that call (detached: never trained);
    `remove()` restores what was there. The patch is an instance-level `forward`
    (ForwardPatches) on every such module that holds parameters."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        for module in root.modules():
            if hasattr(module, "weight_function"):
                continue       # ComfyUI ops: the weight wrappers copy these
            if any(p is not None for p in module._parameters.values()):
                self._patch(module)

    def _patch(self, module: torch.nn.Module) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            saved = {name: p for name, p in module._parameters.items() if p is not None and is_inference_like(p)}
            if not saved:
                return original(*args, **kwargs)
            try:
                with torch.inference_mode(False):
                    for name, value in saved.items():
                        module._parameters[name] = torch.nn.Parameter(ordinary(value), requires_grad=False)
                return original(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        self._replace_forward(module, forward)
