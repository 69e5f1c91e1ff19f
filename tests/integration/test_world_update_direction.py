"""The PRDP update on the miniature world moves the policy toward the images its rewards prefer.

One epoch of the world-demo preset on the pretrained world model: sample 8 training captions x 4
images, score them, take one PRDP optimizer step, then re-evaluate every recorded transition's
log-prob. Within each prompt group, the change of a trajectory's mean log-prob must correlate
positively with its reward (the objective pushes log(pi/pi_ref) differences toward reward
differences / beta). With the update direction flipped (gradient weights negated) the
correlation turns negative and this fails.

This checks the direction of the update on the world, on the batch it was computed from. It is
NOT a held-out learning test: on this world PRDP does not yet raise the reward of unseen prompts
clear of noise (docs/research.md, "Why the world demo does not learn yet").

Measured (seed 0, lr 1e-3): correlation +0.70 (world-preference), +0.80 (world-alignment);
flipped: -0.94 and -0.80.
"""
import pytest
import torch

from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
from comfyui_prdp.config import preset
from comfyui_prdp.rewards import create_reward
from comfyui_prdp.trainer import Trainer
from comfyui_prdp.world.demo_eval import demo_train_prompts
from comfyui_prdp.world.model import build_world_pipeline

MIN_CORRELATION = 0.3


def within_group_correlation(change: torch.Tensor, rewards: torch.Tensor) -> float:
    """Pearson correlation of change and rewards [G, B] after removing each group's mean."""
    change = change - change.mean(1, keepdim=True)
    rewards = rewards - rewards.mean(1, keepdim=True)
    return ((change * rewards).sum() / (change.norm() * rewards.norm())).item()


def update_direction_correlation(reward_name: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    config = preset("world-demo", learning_rate=1e-3, seed=seed)
    backend = DiffusersBackend.from_components(**build_world_pipeline(0), config=config)
    trainer = Trainer(backend, create_reward(reward_name), demo_train_prompts(), config)
    batch = trainer.sample_epoch(0)
    batch.rewards, _ = trainer.score(batch)
    before = batch.traj.logp.clone()
    trainer.update(batch, 0)
    after = trainer.current_logprobs(batch)
    B = config.images_per_prompt
    change = (after - before).double().mean(1).view(-1, B)
    return within_group_correlation(change, batch.rewards.double().view(-1, B))


@pytest.mark.parametrize("reward_name", ["world-preference", "world-alignment"])
def test_one_prdp_step_on_the_world_raises_the_log_prob_of_the_better_images(reward_name):
    correlation = update_direction_correlation(reward_name)
    assert correlation > MIN_CORRELATION, (
        f"{reward_name}: after one PRDP step, the within-group correlation of the log-prob change "
        f"with the reward is {correlation:+.3f}; expected above {MIN_CORRELATION} (the update moves "
        f"the policy away from the images the reward prefers)")
