"""The command line's reward runs on the trainer's --device (issue 20.3).

Model rewards resolved device None to a bare 'cuda' (the current GPU, cuda:0), whatever --device
said: `--device cuda:1` trained on cuda:1 and scored on cuda:0, and `--device cpu` on a GPU
machine put the reward on the GPU in fp16. On this CPU machine two GPUs are simulated by
answering torch.cuda.is_available / device_count; rewards are only built (they load on the CPU
and move at their first score), so nothing is allocated on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_prdp import cli
from comfyui_prdp.cli.reward import make_reward
from comfyui_prdp.backends.diffusers_backend import resolve_device as trainer_device
from comfyui_prdp.rewards import clear_model_cache
from comfyui_prdp.rewards.loading import default_device, resolve_device
from reward_fixtures import reward_model_dir


@pytest.fixture
def two_gpus(monkeypatch):
    """torch answers as on a machine with two CUDA GPUs; the tiny reward models are findable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("PRDP_REWARD_MODELS", str(reward_model_dir()))
    yield
    clear_model_cache()


def cli_reward(*flags: str):
    args = cli.build_parser().parse_args(["train", "--out", "unused", *flags])
    return args, make_reward(args)


@pytest.mark.parametrize("device", ["cuda:1", "cpu", "cuda:0", None])
def test_a_model_reward_runs_on_the_trainers_device(two_gpus, device):
    flags = ["--reward", "aesthetic"] + (["--device", device] if device else [])
    args, reward = cli_reward(*flags)
    assert reward.device == trainer_device(args.device)
    assert reward.dtype == (torch.float32 if reward.device.type == "cpu" else torch.float16)


def test_every_model_in_a_weighted_mix_follows_the_device(two_gpus):
    _, reward = cli_reward("--reward", "weighted", "--reward-spec", "aesthetic:1, jpeg-compressibility:1, "
                           "pickscore:2", "--device", "cuda:1")
    devices = {label: getattr(part, "device", None) for label, _, part in reward.components}
    assert devices["aesthetic"] == devices["pickscore"] == torch.device("cuda", 1), devices


def test_the_device_applies_only_inside_its_block(two_gpus):
    with default_device("cuda:1"):
        assert resolve_device(None) == resolve_device("auto") == torch.device("cuda", 1)
        assert resolve_device("cpu") == torch.device("cpu")       # an explicit device still wins
    assert resolve_device(None) == torch.device("cuda")


def test_a_gpu_that_is_not_there_is_refused_in_one_line(two_gpus):
    with pytest.raises(ValueError, match=r"2 CUDA GPU\(s\).*use cuda:0 \.\. cuda:1") as error:
        resolve_device("cuda:2")
    assert "\n" not in str(error.value)
