"""The reward interface every reward follows, and the registry of reward names."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch


class Reward:
    """A reward: `score(images, prompts) -> [B]`.

    images: float tensor [B, H, W, 3] in 0..1 (ComfyUI's IMAGE layout), any device.
    prompts: list of B strings (ignored by prompt-free rewards).
    Returns a float32 tensor [B] on the CPU. Higher is better.
    """

    name: str = "reward"
    #: True when `score` can propagate gradients to the pixels
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_with_components(
        self, images: torch.Tensor, prompts: List[str]
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The score plus named parts (a weighted sum reports each term)."""
        total = self.score(images, prompts)
        return total, {self.name: total}

    def __call__(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return self.score(images, prompts)

    # Device policy hooks: models move to the GPU to score and back while the UNet trains.
    def prepare(self) -> None:
        """Called right before a scoring phase."""

    def offload(self) -> None:
        """Called after a scoring phase."""


_REGISTRY: Dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    _REGISTRY[name] = factory


def available_rewards() -> List[str]:
    return sorted(_REGISTRY)


def create_reward(name: str, **kwargs) -> Reward:
    """Build a reward by registry name; unknown names get an error listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; choose one of: {', '.join(available_rewards())}"
        )
    return _REGISTRY[name](**kwargs)
