"""How much of a PRDP/DDPO gradient on the world is signal? A gradient-noise diagnostic.

At the base world model (the LoRA at its initial weights) it draws independent batches of
training captions x images and computes, for each, the score-function gradient that PRDP's first
update and DDPO follow: sum over images of (reward - its caption group's mean) x the gradient of
the trajectory's log-prob (trained steps only). It prints the mean cosine between independent
estimates (near 0: each epoch's update is mostly noise; it estimates the squared cosine of one
estimate with the true gradient) and their cosine with the pathwise gradient (the reward
back-propagated through the sampler, averaged over as many images: an estimate of the true
gradient). docs/research.md, "Why the world demo does not learn yet".

    python benchmarks/world_gradient_snr.py --reward world-alignment --captions 32 --estimates 4
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_prdp import sampling  # noqa: E402
from comfyui_prdp.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from comfyui_prdp.config import preset  # noqa: E402
from comfyui_prdp.policies import policy_for  # noqa: E402
from comfyui_prdp.world.alignment import load_or_train_alignment  # noqa: E402
from comfyui_prdp.world.demo_eval import demo_train_prompts  # noqa: E402
from comfyui_prdp.world.model import build_world_pipeline  # noqa: E402
from comfyui_prdp.world.preference import preference_score  # noqa: E402


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return (u @ v / (u.norm() * v.norm()).clamp(min=1e-30)).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", choices=["world-alignment", "world-preference"], default="world-alignment")
    parser.add_argument("--captions", type=int, default=32, help="captions per estimate")
    parser.add_argument("--images", type=int, default=4, help="images per caption")
    parser.add_argument("--estimates", type=int, default=4, help="independent score-function estimates")
    parser.add_argument("--sde-window", default=None, help="FIRST,STOP: only these steps stochastic and trained")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    window = None if args.sde_window is None else [int(v) for v in args.sde_window.split(",")]
    config = preset("world-demo", sde_window=window)
    backend = DiffusersBackend.from_components(**build_world_pipeline(0), config=config)
    shape = tuple(backend.latent_shape(config.height, config.width))
    policy = policy_for(config, backend)
    schedule = policy.schedule(backend, config.steps)
    scorer = load_or_train_alignment(0) if args.reward == "world-alignment" else None
    scaling = float(backend.vae.config.scaling_factor)
    parameters = list(backend.trainable_parameters())
    captions, rng = demo_train_prompts(), random.Random(0)

    def score(x: torch.Tensor, prompts) -> torch.Tensor:
        images = ((backend.vae.decode(x / scaling).sample.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        return preference_score(images) if scorer is None else scorer.similarity(images, prompts)

    def rollout(prompts, with_grad: bool):
        """(rewards, latents before each step and the last, cond, uncond); sampling.sample_trajectories
        runs under no_grad, so the steps are written out for the pathwise gradient."""
        generators = [torch.Generator().manual_seed(rng.randrange(2 ** 31)) for _ in prompts]
        cond = backend.encode_prompts(prompts)
        uncond = sampling.broadcast_row(backend.encode_prompts([""]), len(prompts))
        with torch.set_grad_enabled(with_grad):
            x, visited = sampling.cpu_noise(len(prompts), shape, generators), []
            for i in range(schedule.steps):
                visited.append(x.detach())
                step = torch.full((len(prompts),), i, dtype=torch.long)
                mean, std = sampling.policy_step_distribution(backend, policy, schedule, x, step, cond, uncond,
                                                              cfg=config.cfg)
                x = mean if std is None else mean + std.float() * sampling.cpu_noise(len(prompts), shape, generators)
            visited.append(x.detach())
            return score(x, prompts), visited, cond, uncond

    def gradient() -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters]).double()

    def score_function_estimate() -> torch.Tensor:
        prompts = [c for c in rng.sample(captions, args.captions) for _ in range(args.images)]
        with torch.no_grad():
            rewards, visited, cond, uncond = rollout(prompts, False)
        groups = rewards.double().view(args.captions, args.images)
        advantages = (groups - groups.mean(1, keepdim=True)).flatten()
        for p in parameters:
            p.grad = None
        for i in schedule.trained.tolist():
            step = torch.full((len(prompts),), i, dtype=torch.long)
            mean, std = sampling.policy_step_distribution(backend, policy, schedule, visited[i], step, cond, uncond,
                                                          cfg=config.cfg)
            logp = sampling.gaussian_logprob(visited[i + 1], mean, std, "sum")
            (advantages * logp).sum().div(len(prompts)).backward()
        return gradient()

    def pathwise_estimate(images: int) -> torch.Tensor:
        total = None
        for first in range(0, images, 16):
            for p in parameters:
                p.grad = None
            prompts = rng.sample(captions, min(16, images - first))
            rewards, _, _, _ = rollout(prompts, True)
            (rewards.sum() / images).backward()
            total = gradient() if total is None else total + gradient()
        return total

    started = time.time()
    estimates = [score_function_estimate() for _ in range(args.estimates)]
    pathwise = pathwise_estimate(args.estimates * args.captions * args.images)
    pairs = [cosine(u, v) for u, v in itertools.combinations(estimates, 2)]
    with_pathwise = [cosine(g, pathwise) for g in estimates]
    print(f"{args.reward}, {args.captions} captions x {args.images} images per estimate, steps trained "
          f"{schedule.trained.tolist()}: cosine between independent score-function estimates "
          f"{sum(pairs) / len(pairs):+.3f} (min {min(pairs):+.3f}, max {max(pairs):+.3f}); with the pathwise "
          f"gradient of {len(estimates) * args.captions * args.images} images {sum(with_pathwise) / len(estimates):+.3f}"
          f" ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
