"""The world model: a tiny Stable-Diffusion-shaped pipeline pretrained on the world's renders.

The same component types as SD 1.x for the UNet (UNet2DConditionModel), the text encoder
(CLIPTextModel with the offline CLIP BPE tokenizer) and the schedule (scaled-linear DDIM), only
tiny. The "VAE" is a lossless pixel unshuffle (pixel_vae.py: 32x32x3 <-> 48x8x8), not a learned
AutoencoderKL: a tiny AutoencoderKL trained for the ~1 minute the budget allows still lost the
colours of the objects (measured: reconstruction MSE 0.054, red decoded as purple), while the
UNet on 8x8 positions costs what a latent model costs (a UNet on 32x32 pixels was ~10x slower
per step on two cores). The price: this model cannot be saved as a diffusers folder or a
single-file SD checkpoint (those tests use the texture model, models/embedded.py).
"""
from __future__ import annotations

from typing import Dict

import torch

from .configs import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG
from .pixel_vae import PixelUnshuffleVAE

MODEL_NAME = "embedded-world"   # --base embedded-world


def build_world_pipeline(seed: int = 0, pretrained: bool = True) -> Dict[str, object]:
    """{unet, text_encoder, tokenizer, vae, scheduler}; pretrained on the world (cached, see
    world/pretrain.py) unless `pretrained=False`. The global torch RNG is left untouched."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tokenizer_offline import offline_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    components = dict(unet=unet.eval(), text_encoder=text_encoder.eval(), vae=PixelUnshuffleVAE().eval(),
                      tokenizer=offline_clip_tokenizer(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    if pretrained:
        from .pretrain import load_or_pretrain

        load_or_pretrain(components, seed)
    for module in (components["unet"], components["text_encoder"]):
        module.requires_grad_(False)
    return components
