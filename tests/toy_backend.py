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
    model_name = "toy"

    def __init__(self, channels: int = 2, factor: int = 8, hidden: int = 64, rank: int = 4, seed: int = 0,
                 context_dim: int = 8, image_size: int = 32):
        generator = torch.Generator().manual_seed(seed)
        self.channels, self.factor, self.context_dim = channels, factor, context_dim
        self._alphas = sd_alphas_cumprod()
        self._hidden = hidden
        self._rank = rank
        self._net = None
        self._seed = seed
        self.embedding = torch.randn(97, context_dim, generator=generator)
        self.image_size = image_size
        side = image_size // factor
        self._build(channels * side * side)

    def _build(self, latent_numel: int):
        torch.manual_seed(self._seed)
        first = nn.Linear(latent_numel + self.context_dim + 1, self._hidden)
        self.lora = ToyLoRALinear(first, self._rank, float(self._rank))
        self._net = nn.Sequential(self.lora, nn.Tanh(), nn.Linear(self._hidden, latent_numel))
        for name, p in self._net.named_parameters():
            p.requires_grad_(name.startswith("0.down") or name.startswith("0.up"))
        gen = torch.Generator().manual_seed(self._seed + 1)
        self.projection = torch.randn(3, self.channels, generator=gen)

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
        n = x.shape[0]
        features = torch.cat([x.reshape(n, -1), cond["context"][:, 0], (t.float()[:, None] / 1000.0)], dim=1)
        return self._net(features).view_as(x)

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
