"""CLIP image preprocessing on tensors: batched, on any device, differentiable.

The same steps as CLIP's torchvision pipeline on a PIL image: resize the short side to `size`
(bicubic; the long side is truncated to an int as torchvision does), centre crop, scale to 0..1,
normalise with the CLIP mean/std. Differences from PIL are interpolation rounding only (PIL
works on uint8), well under 1/255 on average.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """torchvision's Resize(size) output: short side = size, long side scaled and truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Images must be [B, H, W, 3] floating point (ComfyUI's IMAGE layout)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, H, W, 3], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must have shape [B, H, W, 3] (ComfyUI IMAGE layout), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in 0..1, got {images.dtype}")
    return images


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """[B, H, W, 3] in 0..1 -> normalised float32 [B, 3, size, size] on the same device."""
    x = check_images(images).float().clamp(0, 1).permute(0, 3, 1, 2)
    height, width = x.shape[-2:]
    new_h, new_w = resized_size(height, width, size)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
