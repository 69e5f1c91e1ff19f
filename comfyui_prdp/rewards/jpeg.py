"""JPEG compressibility rewards (DDPO's definition): no model, just the encoded size.

compressibility = -size_kB, incompressibility = +size_kB, JPEG quality 95.
"""
from __future__ import annotations

import io
from typing import List

import numpy as np
import torch
from PIL import Image

from .base import Reward
from .registry import register_reward

JPEG_QUALITY = 95


def jpeg_size_kb(image: torch.Tensor) -> float:
    """Size in kB (1000 bytes, as DDPO) of one [H, W, 3] 0..1 image saved as JPEG q95."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000.0


class JpegSizeReward(Reward):
    def __init__(self, sign: float, name: str):
        self.sign = sign
        self.name = name

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        sizes = [jpeg_size_kb(image) for image in images]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


register_reward("jpeg-compressibility", lambda **_: JpegSizeReward(-1.0, "jpeg-compressibility"))
register_reward("jpeg-incompressibility", lambda **_: JpegSizeReward(1.0, "jpeg-incompressibility"))
