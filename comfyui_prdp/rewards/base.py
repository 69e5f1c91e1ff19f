"""The reward interface every reward follows, and the registry of reward names."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Tuple

import torch


class Reward:
    """A reward: `score(images, prompts) -> [B]`.

    images: float tensor [B, H, W, 3] in 0..1 (ComfyUI's IMAGE layout), any device.
    prompts: list of B strings (ignored by prompt-free rewards).
    Returns a float32 tensor [B] on the CPU. Higher is better.

    Every `score` and `score_with_components` (the base class's and any a subclass defines)
    checks what it returns: a tensor of shape [B], else a TypeError/ValueError naming the
    reward, the shape returned and the shape expected.
    """

    name: str = "reward"
    #: True when `score` can propagate gradients to the pixels
    differentiable: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method_name, check in _OUTPUT_CHECKS.items():
            method = cls.__dict__.get(method_name)
            if callable(method) and not getattr(method, "checks_output", False):
                setattr(cls, method_name, _checking_output(method, check))

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
    def device_bytes(self) -> int:
        """Bytes of model weights this reward puts on its device while it scores (0: none)."""
        return 0

    def prepare(self) -> None:
        """Called right before a scoring phase."""

    def offload(self) -> None:
        """Called after a scoring phase."""


def reward_device_bytes(reward) -> int:
    """What a reward puts on its device while it scores (0 for reward objects that do not say)."""
    measure = getattr(reward, "device_bytes", None)
    return int(measure()) if callable(measure) else 0


def _image_count(images: Any) -> int:
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


def check_scores(scores: Any, count: int, source: str) -> torch.Tensor:
    """`scores` if it is a tensor of shape [count]; else an error naming `source`."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"{source} returned a {type(scores).__name__}, not a tensor; expected a torch "
            f"tensor of shape [{count}] (one score per image for {count} images)")
    if tuple(scores.shape) != (count,):
        raise ValueError(
            f"{source} returned scores of shape {list(scores.shape)} for {count} images; "
            f"expected shape [{count}] (one score per image)")
    return scores


def _check_score(reward: Reward, result: Any, count: int) -> None:
    check_scores(result, count, f"reward {reward.name!r} ({type(reward).__name__}).score")


def _check_score_with_components(reward: Reward, result: Any, count: int) -> None:
    source = f"reward {reward.name!r} ({type(reward).__name__}).score_with_components"
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(f"{source} returned a {type(result).__name__}; expected a pair "
                        "(total scores, {component name: scores})")
    total, components = result
    check_scores(total, count, source)
    for label, scores in components.items():
        check_scores(scores, count, f"{source}, component {label!r},")


_OUTPUT_CHECKS = {"score": _check_score, "score_with_components": _check_score_with_components}


def _checking_output(method: Callable, check: Callable[[Reward, Any, int], None]) -> Callable:
    """`method(self, images, prompts, ...)`, its result checked against the number of images."""
    @functools.wraps(method)
    def checked(self: Reward, images: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, images, *args, **kwargs)
        check(self, result, _image_count(images))
        return result

    checked.checks_output = True
    return checked


Reward.score_with_components = _checking_output(Reward.score_with_components,
                                                _check_score_with_components)
