"""world-preference: a smooth, prompt-free "aesthetic" score of the kind aesthetic predictors
give, built (not learned) from three image statistics:

    colourfulness (Hasler & Suesstrunk 2003) + luminance contrast (std) - centring distance

The centring term is the distance of the foreground's centre of mass (pixels weighted by how far
their colour is from the border's mean colour) from the image centre, as a fraction of the half
diagonal. Differentiable; typical values 0..1 on the world's renders, higher is better.
"""
from __future__ import annotations

from typing import List

import torch

CENTRING_WEIGHT = 0.5


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(-1)
    rg, yb = r - g, 0.5 * (r + g) - b
    std = (rg.flatten(1).var(1) + yb.flatten(1).var(1) + 1e-8).sqrt()
    mean = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2 + 1e-8).sqrt()
    return std + 0.3 * mean


def contrast(images: torch.Tensor) -> torch.Tensor:
    luminance = images @ torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return luminance.flatten(1).std(1)


def centring_distance(images: torch.Tensor) -> torch.Tensor:
    """0 when the foreground's centre of mass is the image centre, 1 at a corner."""
    n, h, w, _ = images.shape
    border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1).mean(1)
    weight = (images - border[:, None, None]).abs().sum(-1) + 1e-6        # [n, h, w]
    ys = (torch.arange(h, dtype=images.dtype, device=images.device) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=images.dtype, device=images.device) + 0.5) / w - 0.5
    total = weight.sum((1, 2))
    cy = (weight.sum(2) * ys).sum(1) / total
    cx = (weight.sum(1) * xs).sum(1) / total
    return (cx ** 2 + cy ** 2).sqrt() / (0.5 * 2 ** 0.5)


def preference_score(images: torch.Tensor) -> torch.Tensor:
    """[B] scores of [B, H, W, 3] images in 0..1."""
    x = images.float().clamp(0, 1)
    return colourfulness(x) + contrast(x) - CENTRING_WEIGHT * centring_distance(x)


def preference_scores(images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
    return preference_score(images)
