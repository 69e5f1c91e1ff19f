"""PickScore (Kirstain et al., 2023), as its authors compute it.

score = exp(logit_scale) * cos(text embedding, image embedding) with the transformers CLIPModel
`yuvalkirstain/PickScore_v1` (a CLIP ViT-H/14); its processor is the one of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`: 224 px bicubic resize, centre crop, CLIP mean/std, and
OpenAI's CLIP vocabulary (read from the model folder when it has tokenizer files, else from
open_clip's bundled copy: the same ids). Typical values are about 18..23.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from .registry import register_reward
from .clip_backbones import load_transformers_clip
from .loading import RewardOptions, reward_factory
from .model_files import ModelFiles
from .model_reward import ClipReward

PICKSCORE = ModelFiles(
    label="PickScore model (transformers folder)",
    local_names=("PickScore_v1",),
    hf_repo="yuvalkirstain/PickScore_v1",
    is_dir=True,
)


class PickScoreReward(ClipReward):
    name = "pickscore"

    def __init__(self, model_path: Path, **options):
        super().__init__(**options)
        self.clip = load_transformers_clip(model_path, self.dtype, "the PickScore CLIP model")

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        cosine = self.cosine(images, prompts)
        return self.clip.logit_scale().to(cosine.device) * cosine


@reward_factory
def create_pickscore(path: Optional[str] = None, *, options: RewardOptions) -> PickScoreReward:
    """path: the PickScore_v1 folder (config.json + weights) or a repo id."""
    return PickScoreReward(options.locate(PICKSCORE, path), **options.scoring)


register_reward("pickscore", create_pickscore)
