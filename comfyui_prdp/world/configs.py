"""The world model's shapes and schedule: what model.py builds and pretrain.py's cache key names."""
from __future__ import annotations

from ..models.embedded import CROSS_ATTENTION_DIM, TEXT_CONFIG   # the same tiny CLIP text encoder
from .render import IMAGE_SIZE

__all__ = ["TEXT_CONFIG", "LATENT_SIDE", "LATENT_CHANNELS", "UNET_CONFIG", "SCHEDULER_CONFIG"]

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
