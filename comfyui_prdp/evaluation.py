"""Held-out evaluation: images for fixed (prompt, seed) pairs, so the same seeds can be compared
before and after finetuning."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .backends.base import Backend
from .config import TrainConfig
from .policies import policy_for
from .rewards.base import reward_device_bytes
from .sampling import broadcast_row, index_cond, repeat_cond, sample_trajectories


@torch.no_grad()
def sample_images(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], config: TrainConfig,
                  lora: bool = True) -> torch.Tensor:
    """Images [len(prompts) * len(seeds), H, W, 3], prompt-major; each depends only on its seed.
    With lora=False the base model samples (adapters disabled)."""
    prompts = list(prompts)
    backend.prepare_for_sampling()
    cond = repeat_cond(backend.encode_prompts(prompts), len(seeds))
    total = len(prompts) * len(seeds)
    uncond = broadcast_row(backend.encode_prompts([config.negative_prompt]), total)
    shape = tuple(backend.latent_shape(config.height, config.width))
    row_seeds = [s for _ in prompts for s in seeds]
    policy = policy_for(config, backend)
    images = []
    for start in range(0, total, config.sample_batch_size):
        rows = torch.arange(start, min(total, start + config.sample_batch_size))
        generators = [torch.Generator().manual_seed(int(row_seeds[i])) for i in rows.tolist()]
        def run():
            return sample_trajectories(backend, index_cond(cond, rows), index_cond(uncond, rows),
                                       steps=config.steps, cfg=config.cfg, policy=policy, latent_shape=shape,
                                       generator=generators, reduce=config.logprob_reduce)
        if lora:
            traj = run()
        else:
            with backend.adapters_disabled():
                traj = run()
        images.append(backend.decode(traj.final.to(backend.device)).float().cpu())
    return torch.cat(images)


def evaluate_reward(backend: Backend, reward, prompts: Sequence[str], seeds: Sequence[int],
                    config: TrainConfig, lora: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rewards [n], images [n, H, W, 3]) for every (prompt, seed) pair."""
    images = sample_images(backend, prompts, seeds, config, lora=lora)
    row_prompts: List[str] = [p for p in prompts for _ in seeds]
    backend.prepare_for_scoring(reward_device_bytes(reward))
    reward.prepare()
    try:
        scores = reward.score(images, row_prompts).float().cpu()
    finally:
        reward.offload()
    return scores, images
