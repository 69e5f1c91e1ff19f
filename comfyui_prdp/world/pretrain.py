"""Pretraining of the world model on first use, cached on disk.

The UNet and the text encoder are trained together on renders of the TRAINING captions only
(held-out captions stay unseen) to predict the clean latents (x0, the scheduler's "sample"
prediction type) from noised ones; the latents are the lossless pixel-unshuffled renders of a
fixed pool, with 10 % empty captions so classifier-free guidance works. Progress lines with an
estimate of the time left come from progress.py.
Deterministic for a seed on a given torch build and CPU (it runs on PRETRAIN_THREADS threads).
Cached in `$PRDP_CACHE_DIR` (else `~/.cache/comfyui-prdp`) under a key of the configs, the seed
and the schedule.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..models.embedded_pretrain import cache_dir, fixed_threads
from ..progress import PhaseProgress
from .configs import TEXT_CONFIG, UNET_CONFIG
from .grammar import Scene, split_scenes
from .render import render_batch

UNET_STEPS = 600
UNET_BATCH = 32
UNET_LR = 1.5e-3
POOL_SIZE = 6000           # renders whose latents the UNet phase samples from
EMPTY_CAPTION_RATE = 0.1
DATA_VERSION = 3           # bump when the grammar, the renderer or this recipe changes


def _schedule() -> dict:
    return dict(unet_steps=UNET_STEPS, unet_batch=UNET_BATCH, unet_lr=UNET_LR, pool=POOL_SIZE, empty=EMPTY_CAPTION_RATE,
                data=DATA_VERSION)


def cache_key(seed: int) -> str:
    payload = json.dumps({"unet": UNET_CONFIG, "text": TEXT_CONFIG, "seed": seed,
                          "schedule": _schedule(), "torch": torch.__version__.split("+")[0]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(seed: int) -> Path:
    return cache_dir() / f"world-sd-{cache_key(seed)}.safetensors"


def _pixels(images: np.ndarray) -> torch.Tensor:
    """[n, 32, 32, 3] 0..1 numpy -> [n, 3, 32, 32] -1..1 torch."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1


def _render_pool(scenes: List[Scene], count: int, rng: random.Random) -> Tuple[List[Scene], torch.Tensor]:
    picked = [rng.choice(scenes) for _ in range(count)]
    seeds = [rng.randrange(2 ** 31) for _ in range(count)]
    return picked, _pixels(render_batch(picked, seeds))


def pretrain_unet(unet, text_encoder, tokenizer, vae, alphas_cumprod, scenes: List[Scene],
                  rng: random.Random, steps: int = UNET_STEPS) -> None:
    """Train `unet` and `text_encoder` in place to predict clean world latents from noised ones."""
    picked, pixels = _render_pool(scenes, POOL_SIZE, rng)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(500)])
    captions = [scene.caption() for scene in picked] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = len(captions) - 1
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    generator = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=UNET_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 - s / steps)))
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    progress = PhaseProgress("pretraining the embedded world model (once, then cached)", steps)
    for step in range(steps):
        rows = torch.randint(0, len(latents), (UNET_BATCH,), generator=generator)
        drop = torch.rand(UNET_BATCH, generator=generator) < EMPTY_CAPTION_RATE
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (UNET_BATCH,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids[torch.where(drop, torch.full_like(rows, empty), rows)])[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, x0)   # x0 prediction
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step + 1)
    progress.finish()
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)


def pretrain(components: dict, seed: int) -> None:
    """Both phases, in place, from the seed (the global torch RNG is left untouched)."""
    scenes = split_scenes()[0]
    rng = random.Random(seed + 4321)
    with torch.random.fork_rng(devices=[]), fixed_threads():
        torch.manual_seed(seed)
        pretrain_unet(components["unet"], components["text_encoder"], components["tokenizer"], components["vae"],
                      components["scheduler"].alphas_cumprod, scenes, rng)


_PARTS = ("unet", "text_encoder")


def load_or_pretrain(components: dict, seed: int) -> Path:
    """Load the pretrained weights from the cache, or pretrain and cache them atomically."""
    from safetensors.torch import load_file, save_file

    from ..lora.files import atomic_write

    path = cache_path(seed)
    if path.is_file():
        try:
            state = load_file(str(path))
            for part in _PARTS:
                prefix = part + "."
                components[part].load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                  if k.startswith(prefix)})
            return path
        except Exception:   # a broken cache file is rebuilt, never trusted
            pass
    print(f"pretraining the embedded world model once (cached in {path.parent})", flush=True)
    pretrain(components, seed)
    state = {f"{part}.{k}": v.detach().contiguous() for part in _PARTS
             for k, v in components[part].state_dict().items()}
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(f"world model pretraining produced non-finite weights ({key}); "
                               "nothing was cached: report this with your torch version")
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path
