"""Rewards: one module per family, all behind `Reward.score(images, prompts) -> [B]`."""
from .base import Reward, available_rewards, create_reward, register_reward
from . import jpeg  # noqa: F401  (registers the JPEG rewards)

__all__ = ["Reward", "available_rewards", "create_reward", "register_reward"]
