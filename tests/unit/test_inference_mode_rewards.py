"""Rewards built under inference mode (as ComfyUI's Load Reward Model node builds them) score
correctly in the training job's thread, outside inference mode, when their moves really copy.

The GPU path is simulated (tests/support/simulated_gpu.py): the reward is told to score on "cuda",
every move copies, as on a GPU. Before the fix, aesthetic, HPSv2/2.1, ImageReward and any mix
holding one crashed at the first score ("Inference tensors do not track version counter").
"""
from __future__ import annotations

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.models.inference_tensors import inference_like_tensors, make_ordinary
from comfyui_prdp.rewards import create_reward
from comfyui_prdp.rewards.combined import WeightedReward
from comfyui_prdp.rewards.loading import clear_model_cache
from comfy_inprocess import in_thread
from simulated_gpu import copying_moves

HPS = {"arch": F.TINY_OPEN_CLIP}
NEURAL = {
    "aesthetic": {},
    "hpsv2": HPS,
    "hpsv2.1": HPS,
    "imagereward": {},
    "pickscore": {},
    "clipscore": {},
    "weighted": {"components": [("pickscore", 10.0), ("hpsv2", 2.0, HPS), ("aesthetic", 0.05)]},
}


@pytest.fixture(scope="module")
def model_dir():
    return F.reward_model_dir()


@pytest.fixture(scope="module")
def images():
    return F.quantised(F.make_images(4, size=(96, 96), seed=3))


def build(name, model_dir, inference: bool):
    """A fresh reward (the process cache cleared), built in or out of inference mode."""
    clear_model_cache()
    mode = torch.inference_mode() if inference else torch.inference_mode(False)
    with mode:
        return create_reward(name, model_dir=model_dir, allow_download=False, device="cpu", **NEURAL[name])


def model_rewards(reward):
    return [r for _, _, r in reward.components] if isinstance(reward, WeightedReward) else [reward]


def on_simulated_gpu(reward):
    for part in model_rewards(reward):
        part.device = torch.device("cuda")
    return reward


def test_the_simulated_gpu_reproduces_the_crash_a_cpu_move_hides():
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 3)
    layer.to("cpu")
    layer(torch.randn(2, 4))                          # a CPU move is a no-op: nothing shows
    with copying_moves():
        layer.to("cuda")
        with pytest.raises(RuntimeError, match="Inference tensors"):
            layer(torch.randn(2, 4))
    assert list(inference_like_tensors(layer)) == ["weight", "bias"]
    assert make_ordinary(layer) == 2 and not list(inference_like_tensors(layer))
    layer(torch.randn(2, 4))                          # repaired after the damage


@pytest.mark.parametrize("name", list(NEURAL))
def test_a_reward_built_in_inference_mode_scores_in_the_job_thread_on_a_gpu(name, model_dir, images):
    prompts = F.PROMPTS[:len(images)]
    expected = build(name, model_dir, inference=False).score(images, prompts)
    reward = on_simulated_gpu(build(name, model_dir, inference=True))

    def job_thread():           # what the trainer does each epoch: prepare, score, offload
        scores = []
        with copying_moves():
            for _ in range(2):
                reward.prepare()
                scores.append(reward.score(images, prompts))
                reward.offload()
        return scores

    for scores in in_thread(job_thread):
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["aesthetic", "hpsv2", "pickscore"])
def test_pixel_gradients_flow_through_a_reward_built_in_inference_mode(name, model_dir, images):
    reward = on_simulated_gpu(build(name, model_dir, inference=True))

    def job_thread():
        pixels = images.clone().requires_grad_(True)
        with copying_moves():
            reward.score(pixels, F.PROMPTS[:len(images)]).sum().backward()
        return pixels.grad

    gradient = in_thread(job_thread)
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_a_mix_holds_one_part_on_the_gpu_at_a_time_by_default(model_dir, images):
    reward = on_simulated_gpu(build("weighted", model_dir, inference=False))
    parts = model_rewards(reward)
    resident, when_scoring = set(), []

    def watch(part):
        prepare, offload, score = part.prepare, part.offload, part.score
        part.prepare = lambda: (resident.add(id(part)), prepare())[1]
        part.offload = lambda: (resident.discard(id(part)), offload())[1]
        part.score = lambda *a, **k: (when_scoring.append(set(resident)), score(*a, **k))[1]

    for part in parts:
        watch(part)
    with copying_moves():
        reward.prepare()                  # what the trainer calls before the reward phase
        reward.score(images, F.PROMPTS[:len(images)])
        reward.offload()
    assert reward.one_at_a_time
    assert when_scoring == [{id(part)} for part in parts]
    assert not resident


def test_the_human_rewards_assist_scores_on_the_gpu_in_the_job_thread(model_dir, images, tmp_path):
    """PRDP Human Choice Reward with an assist from Load Reward Model (built in inference mode),
    its time limit passed and on_timeout 'assist': the assist scores on the simulated GPU (moves
    that copy) in the job thread, two epochs, and the rewards are its CPU scores min-max scaled
    within each prompt's images, times the weight."""
    import threading

    from comfyui_prdp.rewards.human import HumanReward

    prompts = ["a cat", "a cat", "a dog", "a dog"][:len(images)]
    plain = build("aesthetic", model_dir, inference=False).score(images, prompts).double()
    groups = plain.view(-1, 2)
    low, high = groups.min(dim=1, keepdim=True).values, groups.max(dim=1, keepdim=True).values
    expected = (0.5 * (groups - low) / (high - low)).flatten()
    assist = on_simulated_gpu(build("aesthetic", model_dir, inference=True))
    reward = HumanReward(assist=assist, assist_weight=0.5, time_limit=0.01, on_timeout="assist",
                         poll_seconds=0.005)
    epoch = {"now": 0}
    reward.attach(tmp_path, threading.Event(), images_per_prompt=2, epoch=lambda: epoch["now"])

    def job_thread():
        scores = []
        with copying_moves():
            for _ in range(2):
                reward.prepare()
                scores.append(reward.score(images, prompts))
                reward.offload()
                epoch["now"] += 1
        return scores

    for scores in in_thread(job_thread):
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    assert reward.device_bytes() > 0          # the memory plan counts the assist
