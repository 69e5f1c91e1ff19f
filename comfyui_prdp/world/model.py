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

from ..models.embedded import CROSS_ATTENTION_DIM, TEXT_CONFIG   # the same tiny CLIP text encoder
from .pixel_vae import PixelUnshuffleVAE
from .render import IMAGE_SIZE

MODEL_NAME = "embedded-world"   # --base embedded-world
LATENT_SIDE = IMAGE_SIZE // 4

LATENT_CHANNELS = 3 * 16

UNET_CONFIG = dict(
    sample_size=LATENT_SIDE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
    block_out_channels=(64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=8, norm_num_groups=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    # x0 prediction: with eps prediction over the 48 unshuffled pixel channels the tiny UNet's
    # errors at high noise (MSE 0.1 at t=900 after pretraining) blew up DDIM samples into noise
    prediction_type="sample",
)


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
