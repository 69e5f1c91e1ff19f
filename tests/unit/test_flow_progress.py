"""The progress total (the dashboard's fraction and ETA) is the work an epoch does, in one-image
model evaluations (a forward and backward counts 3): the step events of an epoch add up to it
for DDPM and flow policies (a flow trajectory trains steps - 1 steps: the last is a
deterministic ODE step), an SDE window, several minibatches, and micro-batches smaller than the
sampling batch. Toy backends, no ComfyUI; clip_range 10 so that no clipped row skips its pass."""
import pytest

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend
from toy_flow_backend import ToyFlowBackend

PROMPTS = ["a red apple", "a blue sky", "a green field"]


def first_epoch_steps(backend, **overrides):
    config = TrainConfig().replace(**{**dict(
        epochs=1, prompts_per_epoch=2, images_per_prompt=4, updates_per_epoch=2, steps=5, cfg=3.0,
        width=32, height=32, beta=0.05, clip_range=10.0, learning_rate=0.02, sample_batch_size=4,
        train_batch_size=7, lora_rank=4, seed=1), **overrides})
    events = []
    Trainer(backend, BrightnessReward(), PROMPTS, config, callback=events.append).run()
    return [e for e in events if e["type"] == "step" and e["epoch"] == 1]


@pytest.mark.parametrize("make_backend, overrides", [
    (ToyBackend, {}),
    (ToyFlowBackend, {}),
    (ToyFlowBackend, dict(sde_window=[1, 3])),
    (ToyBackend, dict(minibatch_prompts=1, timestep_fraction=0.6)),
    (ToyBackend, dict(train_batch_size=3, sample_batch_size=8, cfg=1.0)),
])
def test_the_epochs_step_events_add_up_to_the_announced_total(make_backend, overrides):
    steps = first_epoch_steps(make_backend(), **overrides)
    totals = {e["total"] for e in steps}
    assert len(totals) == 1
    assert steps[-1]["step"] == totals.pop()
    assert [e["step"] for e in steps] == sorted(e["step"] for e in steps)


def test_a_flow_run_trains_one_step_fewer_than_it_samples():
    """The premise of the flow count: S + 1 flow steps do the update work of S DDPM steps."""
    ddpm = first_epoch_steps(ToyBackend(), steps=4)
    flow = first_epoch_steps(ToyFlowBackend(), steps=5)
    update = (lambda steps: sum(b["step"] - a["step"] for a, b in zip(steps, steps[1:]) if b["phase"] == "update"))
    assert update(flow) == update(ddpm) > 0
