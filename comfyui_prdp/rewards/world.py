"""The world's rewards in the normal registry: world-alignment (a miniature CLIPScore trained
on the world's captions, alignment.py) and world-preference (a built aesthetic score,
preference.py)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..models.inference_tensors import move_ordinary
from .base import Reward
from .registry import register_reward
from ..world.preference import preference_score


class WorldAlignmentReward(Reward):
    """Cosine similarity in [-1, 1] of an image and its caption under the world's scorer."""

    name = "world-alignment"
    differentiable = True

    def __init__(self, seed: int = 0, device: Optional[str] = None):
        from ..world.alignment import load_or_train_alignment

        self.model = load_or_train_alignment(seed)
        self.device = torch.device(device or "cpu")

    def prepare(self) -> None:
        move_ordinary(self.model, self.device)

    def offload(self) -> None:
        move_ordinary(self.model, "cpu")

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"world-alignment got {len(images)} images but {len(prompts)} prompts; "
                             "give one prompt per image")
        with torch.no_grad():
            scores = self.model.similarity(images.to(self.device).float().clamp(0, 1), list(prompts))
        return scores.float().cpu()


class WorldPreferenceReward(Reward):
    """Colourfulness + contrast - centring distance (prompt-free; see preference.py)."""

    name = "world-preference"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return preference_score(images.detach().cpu()).float()


def _alignment_factory(seed: int = 0, device: Optional[str] = None) -> WorldAlignmentReward:
    return WorldAlignmentReward(seed=seed, device=device)


def _preference_factory() -> WorldPreferenceReward:
    return WorldPreferenceReward()


register_reward("world-alignment", _alignment_factory)
register_reward("world-preference", _preference_factory)
