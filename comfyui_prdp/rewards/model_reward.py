"""The shared machinery of rewards that run a neural model.

Device policy: a model is loaded on the CPU (once per process, see loading.cached_model),
`prepare()` moves it to the scoring device (the GPU when there is one) and `offload()` moves it
back while the diffusion model trains. `score` always runs on the scoring device (moving the
model there if `prepare()` was not called; it stays there until `offload()`).

Inference mode: ComfyUI builds rewards in a node, under `torch.inference_mode()`, and the
training job scores outside it. Every move first makes inference tensors ordinary
(inference_tensors.move_ordinary) and runs outside inference mode, so the moved model works in
either mode (on a GPU a move copies; an inference-mode Parameter given copied data outside
inference mode fails at the next forward).

Gradients: under torch.enable_grad() with images that require grad, `score` is differentiable
with respect to the pixels (preprocessing included); otherwise it runs without autograd.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ..models.inference_tensors import move_ordinary
from .base import Reward
from .clip_preprocess import check_images
from .loading import DEFAULT_BATCH_SIZE, DtypeLike, resolve_device, resolve_dtype


def check_prompts(prompts: Optional[Sequence[str]], count: int, needed: bool) -> List[str]:
    """One string per image (prompt-free rewards accept None)."""
    if prompts is None:
        if needed:
            raise ValueError("this reward needs one prompt per image; got prompts=None")
        return [""] * count
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (one per image), not a single string")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {count} images but {len(prompts)} prompts; pass one prompt per image")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, found {bad[0]}")
    return prompts


class ModelReward(Reward):
    """A reward computed by torch modules; subclasses implement `_score_batch` and `modules`."""

    differentiable = True
    uses_prompts = True

    def __init__(self, *, device: Union[None, str, torch.device] = None, dtype: DtypeLike = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size

    # --- what subclasses provide -----------------------------------------------------------------
    def modules(self) -> List[torch.nn.Module]:
        """The torch modules this reward runs (moved by prepare/offload)."""
        raise NotImplementedError

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """images [b, H, W, 3] on self.device -> float32 [b] on self.device."""
        raise NotImplementedError

    # --- device policy ---------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """The weights in the scoring dtype (floating tensors) or their own (the rest)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        tensors = [t for m in self.modules() for t in list(m.parameters()) + list(m.buffers())]
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)

    def prepare(self) -> None:
        self._move(self.device)

    def offload(self) -> None:
        if self.device.type != "cpu":
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        """Every module onto `device` as ordinary tensors (a no-op where they already are)."""
        for module in self.modules():
            move_ordinary(module, device)

    # --- scoring ---------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: Optional[List[str]] = None) -> torch.Tensor:
        images = check_images(images)
        prompts = check_prompts(prompts, images.shape[0], self.uses_prompts)
        track_grad = torch.is_grad_enabled() and images.requires_grad
        self.prepare()
        with torch.set_grad_enabled(track_grad):
            scores = [
                self._score_batch(images[start:start + self.batch_size].to(self.device),
                                  prompts[start:start + self.batch_size])
                for start in range(0, images.shape[0], self.batch_size)
            ]
            result = torch.cat(scores).float().cpu() if scores else torch.zeros(0)
        return result if track_grad else result.detach()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, device={self.device}, "
                f"dtype={self.dtype}, batch_size={self.batch_size})")


class ClipReward(ModelReward):
    """A reward on one CLIP backbone, `self.clip` (a clip_backbones.ClipBackbone)."""

    def modules(self) -> List[torch.nn.Module]:
        return [self.clip.model]

    def cosine(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """cos(image embedding, text embedding), float32 [b]."""
        image = normalised(self.clip.image_features(images))
        text = normalised(self.clip.text_features(prompts))
        return (image * text).sum(-1)


def normalised(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (float32)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

