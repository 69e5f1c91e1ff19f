"""A short denoising pretraining that makes the embedded tiny UNet a real (if simple) diffusion
model, cached on disk.

A randomly initialised UNet is no denoiser: its samples are noise shaped by random weights,
and a LoRA barely moves them in any consistent direction. Trained for a few hundred steps on
synthetic latents, it learns a data distribution with one obvious knob, the amount of fine
detail (smooth fields blended with white noise, per-sample detail d ~ U(0, 1)), which JPEG size
and similar rewards can push either way. ~45 s on two CPU cores, once; then loaded from the cache
(`$PRDP_CACHE_DIR`, else `~/.cache/comfyui-prdp`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

PRETRAIN_STEPS = 400
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
PRETRAIN_PROMPTS: List[str] = ["a cat", "a dog", "a red car", "a house", "a tree", "a boat", "a bird", "a flower"]
DATA_VERSION = 1   # bump when synthetic_latents changes


def cache_dir() -> Path:
    return Path(os.environ.get("PRDP_CACHE_DIR", Path.home() / ".cache" / "comfyui-prdp"))


#: CPU threads every cached pretraining runs with: the reduction order of torch's CPU kernels
#: depends on the thread count, so without this a cache built under another OMP_NUM_THREADS
#: (a test run, a 16-core machine) held different weights (up to 0.04) than a fresh build
PRETRAIN_THREADS = 2


@contextlib.contextmanager
def fixed_threads(count: int = PRETRAIN_THREADS):
    """Run the body with torch's intra-op thread count set to `count`, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synthetic_latents(n: int, shape, generator: torch.Generator) -> torch.Tensor:
    """[n, C, h, w] latents: a smooth field blended with white noise by detail d ~ U(0, 1),
    normalised to unit std per sample."""
    channels, height, width = shape
    coarse = torch.randn(n, channels, max(1, height // 4), max(1, width // 4), generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    smooth = smooth / smooth.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    detail = torch.rand(n, 1, 1, 1, generator=generator)
    x = (1 - detail) * smooth + detail * torch.randn(n, channels, height, width, generator=generator)
    return x / x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


def pretrain_unet(unet, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, latent_shape, seed: int,
                  steps: int = PRETRAIN_STEPS) -> None:
    """Train `unet` in place to predict the noise of synthetic latents (eps objective), on
    PRETRAIN_THREADS threads (the text encoding too), reporting its progress (progress.py)."""
    with fixed_threads():
        _pretrain_unet(unet, text_encoder, tokenizer, alphas_cumprod, latent_shape, seed, steps)


def _pretrain_unet(unet, text_encoder, tokenizer, alphas_cumprod, latent_shape, seed: int, steps: int) -> None:
    from ..progress import PhaseProgress

    generator = torch.Generator().manual_seed(seed + 12345)
    ids = tokenizer(PRETRAIN_PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        contexts = text_encoder(ids)[0]
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    unet.train()
    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRETRAIN_LR)
    progress = PhaseProgress("pretraining the embedded model (once, then cached)", steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            x0 = synthetic_latents(PRETRAIN_BATCH, latent_shape, generator)
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, len(alphas), (PRETRAIN_BATCH,), generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            context = contexts[torch.randint(0, len(contexts), (PRETRAIN_BATCH,), generator=generator)]
            loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(step + 1)
    progress.finish()
    unet.requires_grad_(False)
    unet.eval()


def cache_key(unet_config: dict, seed: int, steps: int) -> str:
    payload = json.dumps({"unet": unet_config, "seed": seed, "steps": steps, "data": DATA_VERSION,
                          "batch": PRETRAIN_BATCH, "lr": PRETRAIN_LR, "threads": PRETRAIN_THREADS,
                          "torch": torch.__version__.split("+")[0]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_pretrain(components: dict, unet_config: dict, latent_shape, seed: int,
                     steps: int = PRETRAIN_STEPS) -> Path:
    """Load the pretrained UNet weights from the cache, or pretrain and cache them atomically."""
    from safetensors.torch import load_file, save_file

    from ..lora.files import atomic_write

    path = cache_dir() / f"embedded-unet-{cache_key(unet_config, seed, steps)}.safetensors"
    unet = components["unet"]
    if path.is_file():
        try:
            unet.load_state_dict(load_file(str(path)))
            return path
        except Exception:   # a broken cache file is rebuilt, never trusted
            pass
    pretrain_unet(unet, components["text_encoder"], components["tokenizer"],
                  components["scheduler"].alphas_cumprod, latent_shape, seed, steps)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path
