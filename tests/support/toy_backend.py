"""A tiny, fast Backend for testing the algorithm without any diffusion library.

eps = MLP([x, cond, t]) with a LoRA (down/up factors, on/off switch) on the first layer.
decode maps the latent to an RGB image through a fixed random projection and a sigmoid.
"""
from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn

from comfyui_prdp.backends.base import Backend


def sd_alphas_cumprod(num: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class ToyLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            out = out + (x @ self.down.t() @ self.up.t()) * self.scale
        return out


class ToyBackend(Backend):
    """Latents are modelled as Gaussian data x0 ~ N(m(c), DATA_STD^2) per element, and eps is the
    exact denoiser for that data; the prompt-dependent mean m(c) = W c + LoRA(c) is what trains.
    So the sampler is a real diffusion sampler and learning is well posed."""

    model_name = "toy"
    DATA_STD = 0.5

    def __init__(self, channels: int = 2, factor: int = 8, rank: int = 4, seed: int = 0,
                 context_dim: int = 8, image_size: int = 32):
        generator = torch.Generator().manual_seed(seed)
        self.channels, self.factor, self.context_dim = channels, factor, context_dim
        self._alphas = sd_alphas_cumprod()
        self._rank = rank
        self.embedding = torch.randn(97, context_dim, generator=generator)
        self.image_size = image_size
        side = image_size // factor
        numel = channels * side * side
        torch.manual_seed(seed)
        base = nn.Linear(context_dim, numel)
        base.requires_grad_(False)
        self.lora = ToyLoRALinear(base, rank, float(rank))
        self.projection = torch.randn(3, channels, generator=generator)

    @property
    def alphas_cumprod(self):
        return self._alphas

    def latent_shape(self, height, width):
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"the toy backend was built for {self.image_size}px images")
        return (self.channels, height // self.factor, width // self.factor)

    def encode_prompts(self, prompts):
        index = torch.tensor([zlib.crc32(p.encode()) % 97 for p in prompts])
        return {"context": self.embedding[index][:, None, :]}

    def predict_eps(self, x, t, cond):
        mean = self.lora(cond["context"][:, 0]).view_as(x)
        a = self._alphas[t.cpu()].to(x.dtype).view(-1, 1, 1, 1)
        var = self.DATA_STD ** 2
        # posterior-mean denoiser of Gaussian data, written as a noise prediction
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * var + 1 - a)

    def decode(self, latents):
        rgb = torch.einsum("kc,nchw->nhwk", self.projection, latents.float())
        rgb = rgb.repeat_interleave(self.factor, 1).repeat_interleave(self.factor, 2)
        return torch.sigmoid(rgb)

    def trainable_parameters(self):
        return [self.lora.down, self.lora.up]

    @contextlib.contextmanager
    def adapters_disabled(self):
        self.lora.enabled = False
        try:
            yield
        finally:
            self.lora.enabled = True

    def lora_state_dict(self):
        return {"lora_unet_toy.lora_down.weight": self.lora.down.detach().clone(),
                "lora_unet_toy.lora_up.weight": self.lora.up.detach().clone(),
                "lora_unet_toy.alpha": torch.tensor(float(self._rank))}

    def load_lora_state_dict(self, state):
        with torch.no_grad():
            self.lora.down.copy_(state["lora_unet_toy.lora_down.weight"])
            self.lora.up.copy_(state["lora_unet_toy.lora_up.weight"])


class BrightnessReward:
    """Mean pixel value (times sign): a smooth reward the toy model can learn quickly."""
    differentiable = True

    def __init__(self, sign: float = 1.0):
        self.sign = sign
        self.name = "brightness"

    def score(self, images, prompts):
        return self.sign * images.float().mean(dim=(1, 2, 3)).cpu()

    def score_with_components(self, images, prompts):
        value = self.score(images, prompts)
        return value, {self.name: value}

    def prepare(self):
        pass

    def offload(self):
        pass
