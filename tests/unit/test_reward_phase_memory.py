"""The reward phase's device memory: each reward says what it puts on the device, a mix counts
one part at a time by default, and the trainer tells the backend before the reward model moves
(the ComfyUI backend then frees that much of ComfyUI's memory; tests/comfy/inprocess/test_comfy_gpu_path.py)."""
from __future__ import annotations

import reward_fixtures as F
from comfyui_prdp.rewards import create_reward
from comfyui_prdp.rewards.base import Reward
from comfyui_prdp.rewards.combined import WeightedReward
from comfyui_prdp.trainer import Trainer
from dist_worker import PROMPTS, toy_config
from toy_backend import BrightnessReward, ToyBackend


def weight_bytes(module, float_size):
    """Bytes of a module's tensors (non-persistent buffers too) with floating ones in
    `float_size`-byte elements."""
    tensors = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    return sum(t.numel() * (float_size if t.is_floating_point() else t.element_size()) for t in tensors)


def test_a_model_reward_counts_its_weights_in_the_scoring_dtype():
    folder = F.reward_model_dir()
    for dtype, size in (("fp32", 4), ("fp16", 2)):
        reward = create_reward("aesthetic", model_dir=folder, allow_download=False, device="cpu", dtype=dtype)
        assert reward.device_bytes() == sum(weight_bytes(m, size) for m in reward.modules()) > 0


class Sized(Reward):
    """Brightness (a reward the toy model learns) that says it puts `size` bytes on the device."""
    name = "sized"

    def __init__(self, size):
        self.size = size

    def score(self, images, prompts):
        return BrightnessReward().score(images, prompts)

    def device_bytes(self):
        return self.size


def test_a_mix_counts_its_largest_part_one_at_a_time_and_all_parts_together():
    parts = [("a", 1.0, Sized(300)), ("b", 2.0, Sized(500)), ("c", 1.0, Sized(100))]
    assert WeightedReward(parts).device_bytes() == 500
    assert WeightedReward(parts, one_at_a_time=False).device_bytes() == 900


def recording_backend_and_reward(events):
    """A toy backend and a reward class that record, in order, the backend's freeing call and
    the reward's move to its device."""
    class Backend(ToyBackend):
        def prepare_for_scoring(self, reward_bytes):
            events.append(("backend frees", reward_bytes))

    class Reward(Sized):
        def prepare(self):
            events.append(("reward moves", None))

    return Backend, Reward


def test_the_trainer_tells_the_backend_before_the_reward_model_moves():
    events = []
    Backend, Reward = recording_backend_and_reward(events)
    Trainer(Backend(), Reward(12345), PROMPTS, toy_config(epochs=2)).run()
    assert events == [("backend frees", 12345), ("reward moves", None)] * 2
    # a reward object that does not say (duck-typed) counts as nothing on the device
    events.clear()
    Trainer(Backend(), BrightnessReward(), PROMPTS, toy_config(epochs=1)).run()
    assert events == [("backend frees", 0)]


def test_held_out_evaluation_also_frees_room_before_the_reward_moves():
    from comfyui_prdp.evaluation import evaluate_reward

    events = []
    Backend, Reward = recording_backend_and_reward(events)
    evaluate_reward(Backend(), Reward(777), PROMPTS[:2], [0, 1], toy_config())
    assert events == [("backend frees", 777), ("reward moves", None)]
