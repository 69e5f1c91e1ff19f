"""Held-out evaluation: images for fixed (prompt, seed) rows, so the same images can be compared
before and after finetuning, and the paired statistic over independent units.

An image depends only on its (prompt, seed) row and the LoRA. Images that share a seed share
their initial noise and, with a model that barely reads its prompt, are near-duplicates, so they
are not independent samples: the evaluations of this package give every image its own seed
(`distinct_seed_rows`), and `paired_statistics` counts units by seed (rows sharing a seed are
averaged into one unit), so a grid of prompts x the same seeds cannot inflate n or t.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends.base import Backend
from .config import TrainConfig
from .policies import policy_for
from .rewards.base import reward_device_bytes
from .sampling import broadcast_row, index_cond, sample_trajectories

#: seeds reserved per held-out prompt: prompt i's images get seeds first + i * SEED_STRIDE + j, so
#: an image's seed does not depend on how many images the other prompts have
SEED_STRIDE = 64

Progress = Callable[[int, int], None]


def distinct_seed_rows(prompts: Sequence[str], per_prompt: int, first_seed: int) -> Tuple[List[str], List[int]]:
    """(row prompts, row seeds), prompt-major: `per_prompt` images of each prompt, every image
    with its own seed."""
    if not 1 <= per_prompt <= SEED_STRIDE:
        raise ValueError(f"{per_prompt} images per held-out prompt: give 1 to {SEED_STRIDE}")
    prompts = list(prompts)
    return ([p for p in prompts for _ in range(per_prompt)],
            [first_seed + i * SEED_STRIDE + j for i in range(len(prompts)) for j in range(per_prompt)])


def grid_rows(prompts: Sequence[str], seeds: Sequence[int]) -> Tuple[List[str], List[int]]:
    """(row prompts, row seeds), prompt-major: every prompt with every seed (shared seeds)."""
    return [p for p in prompts for _ in seeds], [int(s) for _ in prompts for s in seeds]


@torch.no_grad()
def sample_rows(backend: Backend, row_prompts: Sequence[str], row_seeds: Sequence[int], config: TrainConfig,
                lora: bool = True, progress: Optional[Progress] = None) -> torch.Tensor:
    """Images [rows, H, W, 3], one per (prompt, seed) row; each depends only on its row. With
    lora=False the base model samples (adapters disabled). `progress(done, total)` is called
    after every denoising step of every batch (total = batches x steps)."""
    if len(row_prompts) != len(row_seeds):
        raise ValueError(f"{len(row_prompts)} prompts but {len(row_seeds)} seeds: give one seed per row")
    unique = list(dict.fromkeys(row_prompts))
    backend.prepare_for_sampling()
    encoded = backend.encode_prompts(unique)
    where = {prompt: i for i, prompt in enumerate(unique)}
    cond = index_cond(encoded, torch.tensor([where[p] for p in row_prompts]))
    total = len(row_prompts)
    uncond = broadcast_row(backend.encode_prompts([config.negative_prompt]), total)
    shape = tuple(backend.latent_shape(config.height, config.width))
    policy = policy_for(config, backend)
    batches = math.ceil(total / config.sample_batch_size)
    images = []
    for batch, start in enumerate(range(0, total, config.sample_batch_size)):
        rows = torch.arange(start, min(total, start + config.sample_batch_size))
        generators = [torch.Generator().manual_seed(int(row_seeds[i])) for i in rows.tolist()]
        on_step = None if progress is None else (
            lambda i, steps, batch=batch: progress(batch * steps + i, batches * steps))
        def run():
            return sample_trajectories(backend, index_cond(cond, rows), index_cond(uncond, rows),
                                       steps=config.steps, cfg=config.cfg, policy=policy, latent_shape=shape,
                                       generator=generators, reduce=config.logprob_reduce, on_step=on_step)
        if lora:
            traj = run()
        else:
            with backend.adapters_disabled():
                traj = run()
        images.append(backend.decode(traj.final.to(backend.device)).float().cpu())
    return torch.cat(images)


def sample_images(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], config: TrainConfig,
                  lora: bool = True) -> torch.Tensor:
    """Images [len(prompts) * len(seeds), H, W, 3] of every prompt with every seed, prompt-major."""
    return sample_rows(backend, *grid_rows(prompts, seeds), config, lora=lora)


def score_rows(backend: Backend, reward, row_prompts: Sequence[str], row_seeds: Sequence[int],
               config: TrainConfig, lora: bool = True,
               progress: Optional[Progress] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rewards [rows], images [rows, H, W, 3]) of the (prompt, seed) rows."""
    images = sample_rows(backend, row_prompts, row_seeds, config, lora=lora, progress=progress)
    backend.prepare_for_scoring(reward_device_bytes(reward))
    reward.prepare()
    try:
        scores = reward.score(images, list(row_prompts)).float().cpu()
    finally:
        reward.offload()
    return scores, images


def evaluate_reward(backend: Backend, reward, prompts: Sequence[str], seeds: Sequence[int],
                    config: TrainConfig, lora: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rewards [n], images [n, H, W, 3]) for every prompt with every seed (prompt-major)."""
    return score_rows(backend, reward, *grid_rows(prompts, seeds), config, lora=lora)


def paired_statistics(before: torch.Tensor, after: torch.Tensor, row_seeds: Sequence[int]) -> Dict[str, object]:
    """The paired change after - before of the same rows, over independent units: one unit per
    distinct seed (the rows of a seed averaged). n is the number of units; t is the paired t
    statistic over them (n - 1 degrees of freedom); gain is the mean change in units of the
    units' std before training; improved_fraction is the share of units that rose."""
    before, after = before.double().flatten(), after.double().flatten()
    if not len(before) == len(after) == len(row_seeds):
        raise ValueError(f"{len(before)} rewards before, {len(after)} after and {len(row_seeds)} seeds: "
                         "give one of each per image")
    seeds = [int(s) for s in row_seeds]
    units = {seed: i for i, seed in enumerate(dict.fromkeys(seeds))}
    unit_of = torch.tensor([units[s] for s in seeds]) if len(units) < len(seeds) else None
    if unit_of is not None:                        # rows sharing a seed: one unit, their mean
        counts = torch.bincount(unit_of, minlength=len(units)).double()
        before = torch.zeros(len(units), dtype=torch.float64).index_add_(0, unit_of, before) / counts
        after = torch.zeros(len(units), dtype=torch.float64).index_add_(0, unit_of, after) / counts
    diff = after - before
    n = len(units)
    diff_std = diff.std().item() if n > 1 else float("nan")
    t = diff.mean().item() / (diff_std / math.sqrt(n)) if n > 1 and diff_std > 0 else float("nan")
    spread = before.std().item() if n > 1 else float("nan")
    gain = diff.mean().item() / spread if n > 1 and spread > 0 else float("nan")
    per_unit = len(seeds) / n
    unit = "seed" if per_unit == 1 else f"seed ({per_unit:g} images sharing it averaged)"
    return {"images": len(seeds), "n": n, "unit": unit, "mean_before": before.mean().item(),
            "mean_after": after.mean().item(), "mean_gain": diff.mean().item(), "paired_t": t,
            "degrees_of_freedom": n - 1, "gain_in_std": gain, "improved_fraction": (diff > 0).double().mean().item()}
