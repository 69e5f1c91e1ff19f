"""A lossless 'VAE' for the world model: pixels rearranged 4x4 -> channels (pixel unshuffle).

32x32x3 pixels in [-1, 1] <-> 48x8x8 latents, exactly. It has the parts of diffusers'
AutoencoderKL that the trainer uses (`config.block_out_channels` for the downsample factor,
`latent_channels`, `scaling_factor`, `encode(x).latent_dist`, `decode(z).sample`) and no
weights, so there is nothing to pretrain and nothing is lost in decoding.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

FACTOR = 4


class _Config(dict):
    """A dict whose keys are also attributes (as diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Posterior:
    def __init__(self, latents: torch.Tensor):
        self.mean = latents

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class PixelUnshuffleVAE(torch.nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        # three entries: diffusers reads the downsample factor as 2 ** (len(block_out_channels) - 1)
        self.config = _Config(block_out_channels=(1, 1, 1), latent_channels=channels * FACTOR ** 2,
                              in_channels=channels, scaling_factor=1.0, shift_factor=None)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)   # gives the module a device/dtype

    def encode(self, pixels: torch.Tensor):
        return SimpleNamespace(latent_dist=_Posterior(F.pixel_unshuffle(pixels, FACTOR)))

    def decode(self, latents: torch.Tensor):
        return SimpleNamespace(sample=F.pixel_shuffle(latents, FACTOR))
