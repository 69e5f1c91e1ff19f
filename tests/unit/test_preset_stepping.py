"""The presets take several optimizer steps per epoch, so PRDP's proximal clip can bind.

An epoch's first optimizer step is at theta == theta_old: there the clip cannot bind (clip
fraction 0 by construction) and beta only rescales a gradient that Adam normalises. A preset
with one step per epoch (K = 1, one minibatch of all prompts) would train an unclipped pairwise
policy gradient, not PRDP's proximal update (issue 21, section 3b). world-demo is the one
preset kept on-policy on purpose: its settings are the demo's measured best (config.py).
"""
import math

import pytest

from comfyui_prdp.config import PRESETS, preset
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend
from toy_flow_backend import ToyFlowBackend

ON_POLICY_BY_DESIGN = {"world-demo"}
CONSUMER = sorted(name for name in PRESETS if name.startswith("consumer-gpu"))
PROMPTS = [f"prompt number {i}" for i in range(8)]


@pytest.mark.parametrize("name", sorted(set(PRESETS) - ON_POLICY_BY_DESIGN))
def test_every_training_preset_steps_off_policy_within_an_epoch(name):
    config = preset(name)
    minibatches = math.ceil(config.prompts_per_epoch / (config.minibatch_prompts or config.prompts_per_epoch))
    assert config.optimizer_steps_per_epoch() == config.updates_per_epoch * minibatches
    assert config.optimizer_steps_per_epoch() > 1, f"{name}: one on-policy step per epoch; the clip cannot bind"


def test_a_single_step_structure_is_what_the_count_catches():
    single = preset("consumer-gpu", minibatch_prompts=None)
    assert single.optimizer_steps_per_epoch() == 1 and single.model_evaluations_per_epoch()[
        "update_forward_no_grad"] == 0


def tiny_run_config(name):
    """The preset's stepping structure and objective (N, B, K, minibatch, algorithm, beta, clip,
    lr, policy) on a toy-sized model: fewer steps, tiny latents, float32."""
    return preset(name, epochs=1, steps=8, width=32, height=32, mixed_precision="no",
                  gradient_checkpointing=False, sample_batch_size=16, train_batch_size=64, seed=1)


@pytest.mark.parametrize("name", CONSUMER)
def test_the_consumer_presets_clip_binds_on_a_tiny_run(name):
    config = tiny_run_config(name)
    backend = ToyFlowBackend() if config.policy == "flow_sde" else ToyBackend()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, config)
    clip_fractions = []
    original = trainer.minibatch_gradient

    def minibatch_gradient(*args, **kwargs):
        stats = original(*args, **kwargs)
        clip_fractions.append(stats["clip_frac"])
        return stats

    pass_one = []           # transitions re-evaluated without gradients (pass 1, off-policy steps)
    original_logprobs = trainer._logprobs

    def logprobs(batch, rows, steps, grad_weights, epoch, phase):
        if phase == "update" and grad_weights is None:
            pass_one.append(len(rows))
        return original_logprobs(batch, rows, steps, grad_weights, epoch, phase)

    trainer.minibatch_gradient, trainer._logprobs = minibatch_gradient, logprobs
    metrics = trainer.train_epoch(0)
    assert metrics["optimizer_steps"] == len(clip_fractions) == config.optimizer_steps_per_epoch() > 1
    branches = 2 if config.cfg != 1.0 else 1
    assert sum(pass_one) * branches == config.model_evaluations_per_epoch()["update_forward_no_grad"] > 0
    assert clip_fractions[0] == 0                      # theta == theta_old: nothing can be clipped
    assert max(clip_fractions[1:]) > 0, (name, clip_fractions)


@pytest.mark.parametrize("name, prompts, steps", [
    ("consumer-gpu", 2, 2), ("consumer-gpu", 8, 2), ("consumer-gpu-sdxl", 8, 2),
    ("paper-multi-reward", 8, 4), ("paper-large", 64, 4), ("consumer-gpu-flux", 1, 1)])
def test_another_prompt_count_keeps_the_presets_minibatches(name, prompts, steps):
    """A workflow's prompts_per_epoch (8 in multi_reward, 2 in the quick test) would otherwise
    fall under or far over the preset's fixed minibatch: one on-policy step, or N steps."""
    config = preset(name, prompts_per_epoch=prompts)
    assert config.optimizer_steps_per_epoch() == steps
    assert preset(name, prompts_per_epoch=prompts, minibatch_prompts=prompts).optimizer_steps_per_epoch() == 1
