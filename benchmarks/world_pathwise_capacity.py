"""Can a LoRA of the world model learn a world reward at all? A capacity diagnostic.

Back-propagates the reward through the whole 8-step sampler (the pathwise gradient of
AlignProp/DRaFT: x_{t-1} = mean_theta(x_t) + std * noise with fixed noise, decoded and scored,
differentiated end to end), on 16 random training captions per step, and prints the reward of 8
unseen captions x 4 fixed seeds (the demo's evaluation set) every 10 steps: paired t and gain in
units of the per-image std, as the demo prints them. Compare with PRDP on the same reward
(`run_demo.sh --world --reward ...`): docs/research.md, "Why the world demo does not learn yet".

This is a diagnostic, not a trainer of this package (PRDP and DDPO are).

    python benchmarks/world_pathwise_capacity.py --reward world-preference --targets attn1 --steps 30
"""
from __future__ import annotations

import argparse
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
from comfyui_prdp.world.demo_eval import demo_train_prompts, eval_rows, paired_statistics  # noqa: E402
from comfyui_prdp.world.model import build_world_pipeline  # noqa: E402
from comfyui_prdp.world.preference import preference_score  # noqa: E402

ATTENTION = {name: [f"{name}.to_q", f"{name}.to_k", f"{name}.to_v", f"{name}.to_out.0"]
             for name in ("attn1", "attn2")}
CAPTIONS_PER_STEP = 16


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", choices=["world-alignment", "world-preference"], default="world-alignment")
    parser.add_argument("--targets", default="attn1", help="attn1, attn2 or attn1+attn2")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    targets = [module for part in args.targets.split("+") for module in ATTENTION[part]]
    config = preset("world-demo", lora_targets=targets, lora_rank=args.rank)
    backend = DiffusersBackend.from_components(**build_world_pipeline(0), config=config)
    shape = tuple(backend.latent_shape(config.height, config.width))
    policy = policy_for(config, backend)
    schedule = policy.schedule(backend, config.steps)
    scorer = load_or_train_alignment(0) if args.reward == "world-alignment" else None
    scaling = float(backend.vae.config.scaling_factor)

    def score(prompts, generators, with_grad: bool) -> torch.Tensor:
        cond = backend.encode_prompts(prompts)
        uncond = sampling.broadcast_row(backend.encode_prompts([""]), len(prompts))
        # sampling.sample_trajectories and backend.decode run under no_grad (sampling never needs
        # gradients), so the same steps are written out here with gradients on
        with torch.set_grad_enabled(with_grad):
            x = sampling.cpu_noise(len(prompts), shape, generators)
            for i in range(schedule.steps):
                step = torch.full((len(prompts),), i, dtype=torch.long)
                mean, std = sampling.policy_step_distribution(backend, policy, schedule, x, step, cond, uncond,
                                                              cfg=config.cfg)
                x = mean + std.float() * sampling.cpu_noise(len(prompts), shape, generators)
            pixels = backend.vae.decode(x / scaling).sample.float()
            images = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
            if scorer is None:
                return preference_score(images)
            return scorer.similarity(images, prompts)

    rows, row_seeds = eval_rows(0)      # every unseen image with its own seed

    def evaluate() -> torch.Tensor:
        with torch.no_grad():
            return score(rows, [torch.Generator().manual_seed(s) for s in row_seeds], False).double()

    before = evaluate()
    optimizer = torch.optim.Adam(backend.trainable_parameters(), lr=args.learning_rate)
    train, rng, started = demo_train_prompts(), random.Random(0), time.time()
    for step in range(args.steps):
        prompts = rng.sample(train, CAPTIONS_PER_STEP)
        generators = [torch.Generator().manual_seed(10_000 * step + j) for j in range(CAPTIONS_PER_STEP)]
        reward = score(prompts, generators, True)
        optimizer.zero_grad()
        (-reward.mean()).backward()
        optimizer.step()
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            stats = paired_statistics(before, evaluate(), row_seeds)
            print(f"step {step + 1}: training reward {reward.mean().item():+.3f}; unseen {stats['mean_before']:+.3f}"
                  f" -> {stats['mean_after']:+.3f}, paired t {stats['paired_t']:+.2f}, gain {stats['gain_in_std']:+.2f}"
                  f" std ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
