"""Stop within one model evaluation, and the epoch's cost announced before the first step
(issue 22: at 2048 px one batched step ran for minutes and Stop waited for it)."""
import threading

import pytest
import torch
from torch import nn

from comfyui_prdp.backends.base import block_modules
from comfyui_prdp.config import TrainConfig
from comfyui_prdp.runs.stop_signals import StopRequested
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = ["a red apple", "a blue sky", "a green field", "a white cloud"]


class CountingBlock(nn.Module):
    """An identity block that counts its calls (and may run a callback on one of them)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.on_call = None

    def forward(self, x):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self)
        return x


class BlockToyBackend(ToyBackend):
    """The toy denoiser behind three blocks (a ModuleList, as a UNet's or a DiT's), counting
    the images each model evaluation carries."""

    def __init__(self):
        super().__init__()
        self.denoiser = nn.Module()
        self.denoiser.blocks = nn.ModuleList([CountingBlock() for _ in range(3)])
        self.images_evaluated = {True: 0, False: 0}     # by whether the pass records a gradient

    def predict_eps(self, x, t, cond):
        self.images_evaluated[torch.is_grad_enabled()] += x.shape[0]
        for block in self.denoiser.blocks:
            x = block(x)
        return super().predict_eps(x, t, cond)

    def stop_check_modules(self):
        return block_modules(self.denoiser)


def config(**overrides):
    base = dict(epochs=2, prompts_per_epoch=2, images_per_prompt=4, updates_per_epoch=2, steps=5, cfg=3.0,
                width=32, height=32, beta=0.05, clip_range=0.05, learning_rate=0.02, sample_batch_size=8,
                train_batch_size=8, lora_rank=4, seed=1, timestep_fraction=0.6)
    base.update(overrides)
    return TrainConfig().replace(**base).validate()


def test_block_modules_are_the_elements_of_every_module_list_and_their_children():
    backend = BlockToyBackend()
    assert block_modules(backend.denoiser) == list(backend.denoiser.blocks)
    sequence = nn.Sequential(nn.Linear(2, 2), nn.ReLU())      # e.g. a TimestepEmbedSequential
    model = nn.Module()
    model.blocks = nn.ModuleList([sequence, nn.ModuleList([nn.Identity()])])
    inner = model.blocks[1][0]
    assert block_modules(model) == [sequence, model.blocks[1], inner, sequence[0], sequence[1]]


def test_a_stop_takes_effect_before_the_next_block_of_the_running_evaluation(tmp_path):
    backend = BlockToyBackend()
    stop = threading.Event()
    first, second, third = backend.denoiser.blocks
    lora_before = {k: v.clone() for k, v in backend.lora_state_dict().items()}

    def press_stop_once_sampling_runs(block):        # Stop pressed while block 1 computes
        if block.calls == 3:       # (calls 1 and 2: the cost probe's warm-up and timed evaluation)
            stop.set()
    first.on_call = press_stop_once_sampling_runs
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, config(), out_dir=tmp_path, stop_event=stop)
    result = trainer.run()
    assert result.stopped and result.epochs_done == 0
    assert (first.calls, second.calls, third.calls) == (3, 2, 2)     # block 2 of that evaluation never ran
    assert result.checkpoint_path is not None and (result.checkpoint_path / "lora.safetensors").is_file()
    for key, value in backend.lora_state_dict().items():     # nothing half-trained
        assert torch.equal(value, lora_before[key]), key


def test_a_stop_inside_a_gradient_evaluation_ends_the_run_with_a_checkpoint(tmp_path):
    backend = BlockToyBackend()
    stop = threading.Event()
    events = []

    def callback(event):
        events.append(event)
        if event["type"] == "phase" and event["phase"] == "update":
            backend.denoiser.blocks[1].on_call = lambda block: stop.set()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, config(), out_dir=tmp_path, callback=callback,
                      stop_event=stop)
    calls_at_update = []
    backend.denoiser.blocks[2].on_call = lambda block: calls_at_update.append(stop.is_set())
    result = trainer.run()
    assert result.stopped and result.epochs_done == 0
    assert calls_at_update and not any(calls_at_update)      # block 3 never ran once the stop was asked
    assert result.checkpoint_path is not None


def test_the_stop_hooks_act_only_in_the_trainers_thread_and_only_during_the_run():
    backend = BlockToyBackend()
    stop = threading.Event()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, config(), stop_event=stop)
    block = backend.denoiser.blocks[0]
    x = torch.zeros(1)
    stop.set()
    with trainer._stops_inside_model_calls():
        errors = []
        other = threading.Thread(target=lambda: errors.append(_raises(block, x)))
        other.start()
        other.join()
        assert errors == [False]               # a ComfyUI server's other work is not stopped
        with pytest.raises(StopRequested):
            block(x)
    assert not _raises(block, x)               # the hooks are gone after the run


def _raises(module, x) -> bool:
    try:
        module(x)
    except StopRequested:
        return True
    return False


@pytest.mark.parametrize("overrides", [{}, dict(cfg=1.0, updates_per_epoch=1, timestep_fraction=1.0)])
def test_the_epoch_cost_is_announced_before_the_first_step_from_the_evaluations_an_epoch_makes(overrides):
    """The announced number of one-image evaluations equals what an epoch evaluates, counted
    here: passes without gradient (sampling, the update's current log-probs) + 3 x the passes
    with one (forward and backward)."""
    backend = BlockToyBackend()
    events = []
    counted = {}

    def callback(event):
        events.append(event)
        if event["type"] == "estimate":
            backend.images_evaluated = {True: 0, False: 0}     # the probe's one image is not the epoch's
        if event["type"] == "phase":
            counted[event["phase"]] = dict(backend.images_evaluated)
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, config(epochs=1, **overrides), callback=callback)
    trainer.run()
    kinds = [e["type"] for e in events]
    assert kinds.count("estimate") == 1 and kinds.index("estimate") < kinds.index("step")
    estimate = next(e for e in events if e["type"] == "estimate")
    sampling = counted["reward"]
    assert sampling[True] == 0 and sampling[False] > 0
    with_gradient = backend.images_evaluated[True]
    without = backend.images_evaluated[False] - sampling[False]
    assert with_gradient > 0
    assert estimate["evaluations_per_epoch"] == sampling[False] + without + 3 * with_gradient
    assert estimate["seconds_per_evaluation"] > 0
    assert estimate["epoch_seconds"] == pytest.approx(estimate["seconds_per_evaluation"] *
                                                      estimate["evaluations_per_epoch"])


def test_a_stop_between_two_decoded_chunks_ends_the_run_before_the_reward(tmp_path):
    backend = BlockToyBackend()
    stop = threading.Event()
    decoded = []
    decode = backend.decode

    def decode_and_press_stop(latents):
        decoded.append(len(latents))
        stop.set()
        return decode(latents)
    backend.decode = decode_and_press_stop
    scored = []
    reward = BrightnessReward()
    score = reward.score_with_components
    reward.score_with_components = lambda images, prompts: scored.append(len(images)) or score(images, prompts)
    trainer = Trainer(backend, reward, PROMPTS, config(sample_batch_size=4), out_dir=tmp_path, stop_event=stop)
    result = trainer.run()
    assert result.stopped and decoded == [4] and scored == []      # the second chunk was never decoded


def test_a_stop_during_the_held_out_evaluation_keeps_the_trained_epochs_line(tmp_path):
    """The epoch trained before its held-out evaluation began: its metrics line is written and
    the checkpoint holds it, though the evaluation itself was cut short."""
    import json
    from comfyui_prdp.heldout import HeldOutMonitor, held_out_split

    backend = BlockToyBackend()
    stop = threading.Event()
    cfg = config(eval_every=1, eval_prompts=1, eval_seeds=1, epochs=3)
    prompts, held_out = held_out_split(PROMPTS + ["a black cat"], cfg)

    def callback(event):
        if event["type"] == "phase" and event["phase"] == "held-out evaluation":
            stop.set()
    trainer = Trainer(backend, BrightnessReward(), prompts, cfg, out_dir=tmp_path, callback=callback,
                      stop_event=stop)
    trainer.held_out = HeldOutMonitor(held_out, cfg)
    result = trainer.run()
    assert result.stopped and result.epochs_done == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1] and "eval/reward_mean" not in lines[0]
    assert result.checkpoint_path is not None and result.checkpoint_path.name.startswith("epoch_00001")
