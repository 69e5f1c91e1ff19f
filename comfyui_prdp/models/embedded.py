"""The embedded default model: a tiny Stable-Diffusion-shaped pipeline built from configs.

No download, deterministic random weights from a seed. Same component types and file
layout as SD 1.x (UNet2DConditionModel, CLIPTextModel + CLIP BPE tokenizer, AutoencoderKL
with a downsample factor of 8, a scaled-linear DDIM schedule), only much smaller, so the
whole PRDP loop runs on two CPU cores in minutes. Its images are random textures, not
pictures; it exists to exercise the algorithm and the SD file formats, not to draw.

The model that draws is the miniature world's (`--base embedded-world`, comfyui_prdp/world/),
which the demo uses. This texture model stays the default without --base because the tests of
the file formats need a model with a real AutoencoderKL (diffusers folders, single-file SD
checkpoints, LoRA export and loading), which the world model's lossless pixel 'VAE' is not.
"""
from __future__ import annotations

from typing import Dict

import torch

MODEL_NAME = "embedded-tiny-sd"
CROSS_ATTENTION_DIM = 32

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    # cross-attention at both levels, so attention LoRAs act at the full latent resolution
    # (with attention only at the coarse level a LoRA barely moves the images)
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=8, norm_num_groups=32,
)
# four levels = three 2x downsamples: factor 8 like SD, so 64x64 px <-> 4x8x8 latents
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT_CONFIG = dict(
    hidden_size=CROSS_ATTENTION_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407, projection_dim=CROSS_ATTENTION_DIM,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def build_embedded_pipeline(seed: int = 0, pretrained: bool = True) -> Dict[str, object]:
    """The components {unet, text_encoder, tokenizer, vae, scheduler} of the embedded model.

    Weights depend only on `seed`; the global torch RNG is left untouched. With `pretrained`
    (the default) the UNet gets a short denoising pretraining on synthetic latents, cached on
    disk (see embedded_pretrain.py): without it a LoRA has nothing meaningful to steer.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer_offline import offline_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    components = dict(unet=unet.eval(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                      tokenizer=offline_clip_tokenizer(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    if pretrained:
        from .embedded_pretrain import load_or_pretrain

        side = UNET_CONFIG["sample_size"]
        load_or_pretrain(components, UNET_CONFIG, (UNET_CONFIG["in_channels"], side, side), seed)
    return components


def build_embedded_stable_diffusion_pipeline(seed: int = 0):
    """The embedded model as a diffusers `StableDiffusionPipeline` (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_embedded_pipeline(seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
