"""Human Preference Score v2 and v2.1 (Wu et al., 2023), as their authors compute them.

open_clip `ViT-H-14` loaded with `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (weights
under a "state_dict" key); score = cos(image features, text features), no logit scale (about
0.27 for SD 1.4 images). Preprocessing: 224 px bicubic resize, centre crop, CLIP mean/std;
tokens: open_clip's tokenizer. The `hpsv2` pip package is not used (it lacks its BPE file and
pins old pytest/protobuf); its checkpoints load straight into open_clip.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from .registry import register_reward
from .clip_backbones import load_open_clip
from .loading import RewardOptions, reward_factory
from .model_files import ModelFiles
from .model_reward import ClipReward

HPS_ARCH = "ViT-H-14"
HPS_FILES = {
    "hpsv2": ModelFiles(label="HPSv2 checkpoint", local_names=("HPS_v2_compressed.pt",),
                        hf_repo="xswu/HPSv2", hf_filename="HPS_v2_compressed.pt"),
    "hpsv2.1": ModelFiles(label="HPSv2.1 checkpoint", local_names=("HPS_v2.1_compressed.pt",),
                          hf_repo="xswu/HPSv2", hf_filename="HPS_v2.1_compressed.pt"),
}


class HPSReward(ClipReward):
    def __init__(self, checkpoint: Path, version: str = "hpsv2", arch: str = HPS_ARCH, **options):
        super().__init__(**options)
        self.name = version
        self.clip = load_open_clip(arch, checkpoint, self.dtype,
                                   f"an {version} checkpoint for open_clip {arch}")

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


def _factory(version: str):
    @reward_factory
    def create_hps(path: Optional[str] = None, *, arch: str = HPS_ARCH,
                   options: RewardOptions) -> HPSReward:
        """path: the checkpoint file; arch: the open_clip architecture (ViT-H-14 for HPS)."""
        return HPSReward(options.locate(HPS_FILES[version], path), version, arch,
                         **options.scoring)

    create_hps.__name__ = f"create_{version.replace('.', '_')}"
    return create_hps


create_hpsv2 = _factory("hpsv2")
create_hpsv2_1 = _factory("hpsv2.1")
register_reward("hpsv2", create_hpsv2)
register_reward("hpsv2.1", create_hpsv2_1)
