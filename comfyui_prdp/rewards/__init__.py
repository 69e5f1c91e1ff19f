"""Rewards: one module per family, all behind `Reward.score(images, prompts) -> [B]`.

Registered names: aesthetic, pickscore, hpsv2, hpsv2.1, clipscore, imagereward,
jpeg-compressibility, jpeg-incompressibility, weighted, human (refused by name: it has a node
of its own, rewards/human/), and the miniature world's world-alignment and
world-preference (comfyui_prdp/rewards/world.py). Importing this package is cheap: the
model libraries (open_clip, transformers) are imported only when a model is loaded.
"""
import sys as _sys

from .base import Reward
from .registry import available_rewards, create_reward, register_reward, registered_factory
from . import jpeg  # noqa: F401  (registers the JPEG rewards)
from . import aesthetic, clipscore, hps, imagereward, pickscore  # noqa: F401  (register them)
from . import world  # noqa: F401  (registers world-alignment, world-preference)
# the human reward (issue 24): its own node; by name only a clear refusal (the CLI has nobody to ask)
from .human import HumanReward  # noqa: E402  (registers "human")
from .combined import WeightedReward, paper_multi_reward
from .loading import RewardModelFileError, clear_model_cache
from .model_files import RewardModelNotFoundError, register_comfy_folder

if "folder_paths" in _sys.modules:  # inside ComfyUI: make models/reward_models known right away
    register_comfy_folder()

__all__ = [
    "Reward", "available_rewards", "create_reward", "register_reward", "registered_factory", "WeightedReward",
    "paper_multi_reward", "RewardModelFileError", "RewardModelNotFoundError",
    "clear_model_cache", "register_comfy_folder", "HumanReward",
]
