"""The online loop on the toy backend: exact gradient, checkpoints, resume, stop, learning."""
import json
import threading

import pytest
import torch

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.lora.files import load_lora
from comfyui_prdp.objective import ddpo_loss, prdp_loss
from comfyui_prdp.sampling import transition_logprob
from comfyui_prdp.trainer import Trainer, latest_checkpoint
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = ["a red apple", "a blue sky", "a green field", "a white cloud", "a black cat"]


def toy_config(**overrides):
    base = dict(epochs=3, prompts_per_epoch=2, images_per_prompt=4, updates_per_epoch=2, steps=5, cfg=3.0,
                width=32, height=32, beta=0.05, clip_range=0.05, learning_rate=0.02, sample_batch_size=4,
                train_batch_size=7, lora_rank=4, seed=1)
    base.update(overrides)
    return TrainConfig().replace(**base)


def sampled_trainer(algorithm="prdp", **overrides):
    backend = ToyBackend()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, toy_config(algorithm=algorithm, **overrides))
    batch = trainer.sample_epoch(0)
    batch.rewards, _ = trainer.score(batch)
    batch.logp_ref = trainer.reference_logprobs(batch, 0)
    return trainer, backend, batch


def test_onpolicy_check_and_metrics_file(tmp_path):
    events = []
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=2), out_dir=tmp_path,
                      callback=events.append)
    result = trainer.run()
    assert result.epochs_done == 2 and not result.stopped
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"reward_mean", "reward_std", "loss", "clip_frac", "kl", "seconds_sampling"} <= set(m)
        assert m["onpolicy_max_diff"] < 1e-5
    assert lines[1]["kl"] > 0   # epoch 2 samples from a trained LoRA
    state, meta = load_lora(result.lora_path)
    assert meta["algorithm"] == "prdp" and meta["epochs"] == "2"
    types = {e["type"] for e in events}
    assert {"phase", "step", "epoch", "done"} <= types
    progress = [e["progress"] for e in events if e["type"] == "step"]
    assert progress == sorted(progress) and 0 < progress[-1] <= 1


def test_resume_equals_uninterrupted_run(tmp_path):
    full = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=tmp_path / "full")
    full_result = full.run()

    first = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3, checkpoint_every=1),
                    out_dir=tmp_path / "part")
    first.config = first.config.replace(epochs=2)   # the first process ends after epoch 2
    first.run()
    checkpoint = latest_checkpoint(tmp_path / "part")
    assert checkpoint.name == "epoch_00002"

    resumed = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3),
                      out_dir=tmp_path / "part")
    result = resumed.run(resume_from=checkpoint)
    full_state = full.backend.lora_state_dict()
    for key, value in resumed.backend.lora_state_dict().items():
        assert torch.equal(value, full_state[key]), key
    assert result.epochs_done == 3
    metrics = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[2]["reward_mean"] == pytest.approx(full_result.metrics[2]["reward_mean"])


def test_stop_request_saves_checkpoint_and_lora(tmp_path):
    stop = threading.Event()

    def callback(event):
        if event["type"] == "epoch" and event["epoch"] == 1:
            stop.set()

    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=5), out_dir=tmp_path,
                      callback=callback, stop_event=stop)
    result = trainer.run()
    assert result.stopped and result.epochs_done == 1
    assert result.checkpoint_path is not None and (result.checkpoint_path / "lora.safetensors").is_file()
    assert result.lora_path.is_file()
    resumed = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=2), out_dir=tmp_path)
    final = resumed.run(resume_from=tmp_path)
    assert final.epochs_done == 2 and final.lora_path != result.lora_path   # never overwrites


def test_bad_inputs_are_refused_before_work():
    with pytest.raises(ValueError, match="no prompts"):
        Trainer(ToyBackend(), BrightnessReward(), ["  ", ""], toy_config())
    with pytest.raises(ValueError, match="images_per_prompt"):
        Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(images_per_prompt=1))
    with pytest.raises(ValueError, match="multiple of 8"):
        Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(width=30))


def held_out_brightness(backend, trainer):
    from comfyui_prdp.evaluation import sample_images
    images = sample_images(backend, ["a red apple", "a black cat"], seeds=list(range(6)),
                           config=trainer.config)
    return images.mean().item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_toy_learning_moves_reward_in_the_rewarded_direction(sign):
    # a weak signal next to the seed-to-seed spread (one seed's change in the rewarded direction
    # ranges from -0.05 to +0.035), so the test asserts on the mean over 12 seeds: measured
    # +0.0078 (sign +1) and +0.0090 (sign -1) with the correct update, -0.076 and -0.034 with the
    # update direction flipped. test_learning.py is the stronger check.
    changes = []
    for seed in range(1, 13):
        backend = ToyBackend()
        config = toy_config(epochs=6, updates_per_epoch=2, learning_rate=0.05, clip_range=0.5, beta=0.01, seed=seed)
        trainer = Trainer(backend, BrightnessReward(sign), PROMPTS, config)
        before = held_out_brightness(backend, trainer)
        trainer.run()
        changes.append(sign * (held_out_brightness(backend, trainer) - before))
    assert sum(changes) / len(changes) > 0.003, [round(c, 4) for c in changes]
