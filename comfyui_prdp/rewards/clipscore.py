"""CLIPScore (Hessel et al., 2021): 2.5 * max(cos(image embedding, text embedding), 0).

Default backbone: the transformers folder of OpenAI CLIP ViT-L/14 (shared with the aesthetic
reward, so it is loaded once). Any transformers CLIP folder works via `path=`; an open_clip
model via `arch=` plus a weight file in `path=`. Values are in 0..2.5 (about 0.6..0.9 for a
matching caption).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .aesthetic import OPENAI_CLIP_L14
from .registry import register_reward
from .clip_backbones import ClipBackbone, load_open_clip, load_transformers_clip
from .loading import RewardOptions, reward_factory
from .model_files import ModelFiles
from .model_reward import ClipReward

CLIPSCORE_WEIGHT = 2.5


class CLIPScoreReward(ClipReward):
    name = "clipscore"

    def __init__(self, load_clip: Callable[[torch.dtype], ClipBackbone], **options):
        """load_clip(dtype) -> the backbone (called once the dtype policy is resolved)."""
        super().__init__(**options)
        self.clip = load_clip(self.dtype)

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return CLIPSCORE_WEIGHT * self.cosine(images, prompts).clamp_min(0)


@reward_factory
def create_clipscore(path: Optional[str] = None, *, arch: Optional[str] = None,
                     options: RewardOptions) -> CLIPScoreReward:
    """path: a transformers CLIP folder/repo id, or (with arch=) an open_clip weight file."""
    if arch is not None:
        if path is None:
            raise ValueError(f"clipscore with arch={arch!r} needs path= to its weight file")
        spec = ModelFiles(label=f"open_clip {arch} weights", local_names=(str(path),))
        weights = options.locate(spec, path, local_only=True)

        def load_clip(dtype):
            return load_open_clip(arch, weights, dtype, f"open_clip {arch} weights")
    else:
        folder = options.locate(OPENAI_CLIP_L14, path)

        def load_clip(dtype):
            return load_transformers_clip(folder, dtype, "a transformers CLIP model")

    return CLIPScoreReward(load_clip, **options.scoring)


register_reward("clipscore", create_clipscore)
