"""LAION improved aesthetic predictor v2 (Schuhmann et al.), as its authors compute it.

score = MLP(e / |e|), e = the CLIP ViT-L/14 image embedding (projection, 768-d) of the image
after CLIP preprocessing. The MLP is 768-1024-128-64-16-1 with dropouts 0.2/0.2/0.1 and no
activations (keys layers.0/2/4/6/7), file `sac+logos+ava1-l14-linearMSE.pth`. Scores are
roughly 1..10. Prompts are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .registry import register_reward
from .clip_backbones import load_transformers_clip
from .loading import (
    RewardModelFileError, RewardOptions, cached_model, freeze, load_weights_into,
    read_state_dict, reward_factory,
)
from .model_files import ModelFiles
from .model_reward import ModelReward, normalised

AESTHETIC_MLP = ModelFiles(
    label="LAION aesthetic predictor v2 head",
    local_names=("sac+logos+ava1-l14-linearMSE.pth",),
    hf_repo="camenduru/improved-aesthetic-predictor",
    hf_filename="sac+logos+ava1-l14-linearMSE.pth",
)
OPENAI_CLIP_L14 = ModelFiles(
    label="OpenAI CLIP ViT-L/14 (transformers folder)",
    local_names=("clip-vit-large-patch14",),
    hf_repo="openai/clip-vit-large-patch14",
    is_dir=True,
)
_EXPECTED_MLP = "the LAION aesthetic MLP (keys layers.0/2/4/6/7.weight/bias, 768 inputs)"


class AestheticMLP(nn.Module):
    """The predictor head: five linear layers, dropouts between the first four, no activations."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def load_aesthetic_mlp(path: Path) -> AestheticMLP:
    """The MLP head from its state dict file (fp32 on the CPU), cached per file."""
    def build() -> AestheticMLP:
        state = read_state_dict(path, _EXPECTED_MLP)
        first = state.get("layers.0.weight")
        if first is None or first.ndim != 2:
            raise RewardModelFileError(
                f"{path} is not {_EXPECTED_MLP}: it has no 2-D 'layers.0.weight' (found keys "
                f"like {', '.join(list(state)[:3])}).")
        mlp = AestheticMLP(first.shape[1])
        load_weights_into(mlp, state, path, _EXPECTED_MLP)
        return freeze(mlp)

    return cached_model(("aesthetic-mlp", str(path)), build)


class AestheticReward(ModelReward):
    name = "aesthetic"
    uses_prompts = False

    def __init__(self, mlp_path: Path, clip_path: Path, **options):
        super().__init__(**options)
        self.mlp = load_aesthetic_mlp(mlp_path)
        self.clip = load_transformers_clip(clip_path, self.dtype, "OpenAI CLIP ViT-L/14")
        width = self.mlp.layers[0].in_features
        projection = self.clip.model.config.projection_dim
        if width != projection:
            raise ValueError(
                f"the aesthetic head {mlp_path} expects {width}-d CLIP embeddings but the CLIP "
                f"model in {clip_path} gives {projection}-d ones; use CLIP ViT-L/14.")

    def modules(self) -> List[nn.Module]:
        return [self.clip.model, self.mlp]

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        embedding = normalised(self.clip.image_features(images))
        return self.mlp(embedding).squeeze(-1)


@reward_factory
def create_aesthetic(path: Optional[str] = None, *, clip_path: Optional[str] = None,
                     options: RewardOptions) -> AestheticReward:
    """path: the MLP .pth; clip_path: a transformers CLIP ViT-L/14 folder (or repo id)."""
    return AestheticReward(options.locate(AESTHETIC_MLP, path),
                           options.locate(OPENAI_CLIP_L14, clip_path), **options.scoring)


register_reward("aesthetic", create_aesthetic)
