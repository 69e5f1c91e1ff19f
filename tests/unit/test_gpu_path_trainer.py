"""The trainer's GPU path, checked on the CPU (issue 20, section 3):

- resume: AdamW state loaded before the LoRA moves follows it at the first step (a float64
  conversion stands in for the move to a GPU: on a CPU `.to("cpu")` copies nothing);
- device-to-host syncs: counted by following which tensors would live on the device;
- float16 models: dynamic loss scaling keeps gradients that float16 flushes to zero;
- re-evaluation in the sampling batches' layout: unchanged weights give the recorded log-probs
  exactly, on a model whose output depends on the batch it is evaluated in.
"""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from comfyui_prdp.runs import checkpoints
from comfyui_prdp.objective import DynamicLossScale
from comfyui_prdp.policies.ddpm import DDPMPolicy
from comfyui_prdp.sampling import sample_trajectories
from comfyui_prdp.trainer import Trainer
from comfyui_prdp.training.batches import micro_batches
from toy_backend import BrightnessReward, ToyBackend, ToyLoRALinear

from test_trainer import PROMPTS, toy_config as trainer_config  # noqa: E402


def toy_config(**overrides):
    """test_trainer's toy settings, one epoch of one update unless overridden."""
    return trainer_config(**{"epochs": 1, "updates_per_epoch": 1, **overrides}).validate()


class CastingLoRALinear(ToyLoRALinear):
    """The toy LoRA computing in its factors' dtype (float64 after the stand-in 'move')."""

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            delta = x.to(self.down.dtype) @ self.down.t() @ self.up.t()
            out = out + (delta * self.scale).to(out.dtype)
        return out


class MovingToyBackend(ToyBackend):
    """The LoRA factors are float32 at construction ("on the CPU") and become float64 when the
    model loads for sampling or training: a move that really copies, like the move to a GPU.
    Parameter objects stay the same (as Module.to keeps them), only their data moves."""

    def __init__(self):
        super().__init__()
        self.lora.__class__ = CastingLoRALinear

    def prepare_for_sampling(self):
        self._move()

    def prepare_for_training(self):
        self._move()

    def _move(self):
        for param in self.trainable_parameters():
            param.data = param.data.to(torch.float64)


# ----------------------------------------------------------------------------- 1. resume
def test_a_resumed_run_steps_after_the_lora_moves_and_the_adam_state_follows_it(tmp_path):
    first = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=1, checkpoint_every=1),
                    out_dir=tmp_path / "first")
    checkpoint = first.run().checkpoint_path
    saved = {name: value.clone() for name, value in first.optimizer.state[first.backend.lora.up].items()}

    backend = MovingToyBackend()
    resumed = Trainer(backend, BrightnessReward(), PROMPTS, toy_config(epochs=2))
    assert resumed.run(resume_from=checkpoint).epochs_done == 2    # the step raised a dtype mismatch before
    state = resumed.optimizer.state[backend.lora.up]
    assert backend.lora.up.dtype == torch.float64
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float64
    assert state["step"].item() == saved["step"].item() + 1


def test_align_optimizer_state_moves_only_what_differs_and_keeps_the_values():
    backend = ToyBackend()
    params = backend.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    assert checkpoints.align_optimizer_state(optimizer) == 0          # already in place: nothing copied
    for param in params:
        param.data = param.data.to(torch.float64)
    assert checkpoints.align_optimizer_state(optimizer) == 2 * len(params)   # exp_avg, exp_avg_sq each
    for param in params:
        state = optimizer.state[param]
        assert state["step"].dtype == torch.float32                  # step stays where AdamW keeps it
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].dtype == torch.float64
            assert torch.equal(state[name], before[id(param)][name].double())
        param.grad = torch.randn_like(param)
    optimizer.step()                                                   # the mismatch raised here before


# ----------------------------------------------------------------------------- 2. syncs
HOST_READS = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


class DeviceToHostCounter(TorchFunctionMode):
    """Counts the device-to-host syncs a GPU would make, on the CPU. Tensors derived (through any
    torch call) from `device_tensors` stand for device tensors; reading one on the host (.cpu(),
    .item(), .tolist(), bool(), float(), .numpy(), .to(a CPU device)) is a sync. The host copy
    is a new tensor, as on a GPU (on a CPU `.cpu()` would return the same one). Results of a call
    with a device input are device tensors, except inputs handed back (in-place ops, grouping)."""

    def __init__(self, device_tensors):
        super().__init__()
        self.on_device, self.kept, self.syncs = set(), [], 0
        for tensor in device_tensors:
            self._mark(tensor)

    def _mark(self, tensor):
        self.on_device.add(id(tensor))
        self.kept.append(tensor)        # ids stay unique while the counter lives

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        if not inputs & self.on_device:
            return out
        if func in HOST_READS or (func is torch.Tensor.to and self._to_host(args, kwargs)):
            self.syncs += 1
            return out.clone() if isinstance(out, torch.Tensor) else out
        for tensor in tree_leaves(out):      # results are on the device; inputs handed back keep their place
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:
                self._mark(tensor)
        return out

    @staticmethod
    def _to_host(args, kwargs):
        """`.to("cpu")` written out. A torch.device target (`x.device`, `backend.device`) is the
        device itself here, where the device is the CPU: not counted."""
        targets = [a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, str)]
        return any(torch.device(t).type == "cpu" for t in targets)


def device_tensors(backend, *conds):
    return list(backend.lora.parameters()) + [value for cond in conds for value in cond.values()]


@pytest.mark.parametrize("with_reference", [True, False])
def test_sampling_syncs_once_per_step_and_once_for_the_log_probs(with_reference):
    backend = ToyBackend()
    cond = backend.encode_prompts(["a red apple", "a blue sky", "a green field"])
    uncond = backend.encode_prompts([""] * 3)
    steps = 6
    with DeviceToHostCounter(device_tensors(backend, cond, uncond)) as counter:
        traj = sample_trajectories(backend, cond, uncond, steps=steps, cfg=3.0, latent_shape=(2, 4, 4),
                                   generator=torch.Generator().manual_seed(0), policy=DDPMPolicy(1.0),
                                   with_reference=with_reference)
    assert traj.logp.shape == (3, steps) and traj.latents.shape[1] == steps + 1
    assert counter.syncs == steps + 1      # the latents of each step, then every log-prob and KL at once (4 a step before)


def test_an_optimizer_step_syncs_twice_whatever_the_number_of_lora_tensors():
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config())
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5, generator=generator)) for _ in range(12)]
    trainer.optimizer = torch.optim.AdamW(params, lr=0.01)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    with DeviceToHostCounter(params + [p.grad for p in params]) as counter:
        grad_norm = trainer._optimizer_step(params, 0)
    assert math.isfinite(grad_norm)
    assert counter.syncs == 2              # the norm before the step, finiteness after it (1 + 12 before)


def test_re_evaluation_syncs_once_per_call_not_per_micro_batch():
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(train_batch_size=4))
    batch = trainer.sample_epoch(0)
    with DeviceToHostCounter(device_tensors(trainer.backend, batch.cond, batch.uncond)) as counter:
        values = trainer.current_logprobs(batch)
    assert torch.equal(values, batch.traj.logp)
    assert counter.syncs == 1              # 10 micro-batches here, one copy each before


def test_a_non_finite_step_is_still_refused_after_batching_the_check():
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config())
    params = trainer.backend.trainable_parameters()
    trainer.optimizer.param_groups[0]["lr"] = float("inf")
    for param in params:
        param.grad = torch.ones_like(param)
    with pytest.raises(FloatingPointError, match="made the LoRA weights non-finite"):
        trainer._optimizer_step(params, 0)


# ----------------------------------------------------------------------------- 3. float16
class HalfLoRALinear(ToyLoRALinear):
    """The toy LoRA computing in `compute` (float16, or float32 for the reference) with float32
    factors, as a LoRA on a float16 model does."""
    compute = torch.float16

    def forward(self, x):
        x = x.to(self.compute)
        out = torch.nn.functional.linear(x, self.base.weight.to(self.compute), self.base.bias.to(self.compute))
        if self.enabled:
            out = out + (x @ self.down.to(self.compute).t() @ self.up.to(self.compute).t()) * self.scale
        return out


class Float16ToyBackend(ToyBackend):
    """The toy model computing in float16 on the CPU (dtype float16: the sampler casts latents)."""

    def __init__(self):
        super().__init__()
        self.lora.__class__ = HalfLoRALinear
        self.compute(torch.float16)

    def compute(self, dtype):
        self.dtype = dtype
        self.lora.compute = dtype


def tiny_gradient_config(**overrides):
    # at theta_old == reference and beta 1e5 the weights w are ~R / beta ~ 1e-8 and the model
    # output's gradient far below float16's smallest subnormal (6e-8), as 1e-4 / 65,536 is
    # (at beta 1e4 a third of the gradient survives unscaled, at 1e5 none)
    return toy_config(beta=1e5, clip_range=1e-4, learning_rate=1e-3, **overrides)


def first_step_gradients(trainer):
    seen = {}
    original_step, original_update = trainer.optimizer.step, trainer.update

    def step(*args, **kwargs):
        seen.setdefault("grads", [p.grad.detach().clone() for p in trainer.backend.trainable_parameters()])
        return original_step(*args, **kwargs)

    def update(batch, epoch):
        seen["batch"] = batch
        return original_update(batch, epoch)

    trainer.optimizer.step, trainer.update = step, update
    metrics = trainer.train_epoch(0)
    return seen.get("grads"), seen["batch"], metrics


def float32_gradient(trainer, batch, start):
    """The same minibatch's gradient with the same model computing in float32."""
    backend = trainer.backend
    with torch.no_grad():
        for param, value in zip(backend.trainable_parameters(), start):
            param.copy_(value)
    backend.compute(torch.float32)
    scale, trainer.loss_scale = trainer.loss_scale, None
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.minibatch_gradient(batch, torch.arange(len(batch.prompts)), torch.arange(batch.traj.logp.shape[1]),
                               True, 0)
    trainer.loss_scale = scale
    backend.compute(torch.float16)
    return [p.grad.detach().clone() for p in backend.trainable_parameters()]


def relative_error(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want)) / max(b.abs().max().item() for b in want)


def test_float16_gradients_that_underflow_unscaled_survive_with_loss_scaling():
    backend = Float16ToyBackend()
    start = [p.detach().clone() for p in backend.trainable_parameters()]
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, tiny_gradient_config())
    assert trainer.loss_scale is not None and trainer.loss_scale.scale == 2.0 ** 16
    grads, batch, metrics = first_step_gradients(trainer)
    want = float32_gradient(trainer, batch, start)
    assert max(b.abs().max().item() for b in want) > 0
    # float16's rounding of the forward pass (4.5 % here); unscaled, every element is 0 (error 1)
    assert relative_error(grads, want) < 0.1, relative_error(grads, want)
    assert metrics["skipped_steps"] == 0 and metrics["optimizer_steps"] == 1 and metrics["loss_scale"] == 2.0 ** 16

    # the premise: without the scale float16 flushes this gradient to zero
    with torch.no_grad():
        for param, value in zip(backend.trainable_parameters(), start):
            param.copy_(value)
    trainer.loss_scale = None
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.minibatch_gradient(batch, torch.arange(len(batch.prompts)), torch.arange(batch.traj.logp.shape[1]),
                               True, 0)
    assert all(p.grad.abs().max().item() == 0 for p in backend.trainable_parameters())


def test_an_overflowing_scale_skips_the_step_halves_and_leaves_the_lora():
    backend = Float16ToyBackend()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, tiny_gradient_config())
    trainer.loss_scale.scale = 2.0 ** 60          # w * scale ~ 1e10: beyond float16's 65504
    start = [p.detach().clone() for p in backend.trainable_parameters()]
    metrics = trainer.train_epoch(0)
    assert metrics["skipped_steps"] == 1 and metrics["optimizer_steps"] == 0 and math.isnan(metrics["grad_norm"])
    assert trainer.loss_scale.scale == 2.0 ** 59
    assert all(torch.equal(p, s) for p, s in zip(backend.trainable_parameters(), start))
    assert trainer.extra_state()["loss_scale"] == {"scale": 2.0 ** 59, "good_steps": 0}


def test_the_loss_scale_grows_after_good_steps_and_gives_up_at_its_minimum():
    scale = DynamicLossScale(scale=4.0, growth_interval=2)
    scale.step_taken()
    assert scale.scale == 4.0
    scale.step_taken()
    assert scale.scale == 8.0
    assert scale.back_off() and scale.back_off() and scale.back_off() and scale.scale == 1.0
    assert not scale.back_off()               # non-finite even unscaled: the trainer raises
    restored = DynamicLossScale()
    restored.load_state_dict({"scale": 8.0, "good_steps": 1})
    assert restored.state_dict() == {"scale": 8.0, "good_steps": 1}
    with pytest.raises(ValueError, match="loss scale"):
        restored.load_state_dict({"scale": float("nan")})


def test_float32_and_bfloat16_models_get_no_loss_scale():
    assert Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config()).loss_scale is None
    bf16 = ToyBackend()
    bf16.dtype = torch.bfloat16
    trainer = Trainer(bf16, BrightnessReward(), PROMPTS, toy_config())
    assert trainer.loss_scale is None and "loss_scale" not in trainer.extra_state()
    declared = ToyBackend()
    declared.compute_dtype = torch.float16     # a host that takes float32 inputs and computes in float16
    assert Trainer(declared, BrightnessReward(), PROMPTS, toy_config()).loss_scale is not None


# ----------------------------------------------------------------------------- 4. layout
class BatchSensitiveToyBackend(ToyBackend):
    """A model whose output depends (by ~1e-7) on the batch it is evaluated in, as GPU kernels
    round differently by batch size; `calls` records the rows of each model call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict_eps(self, x, t, cond):
        self.calls.append(len(x))
        eps = super().predict_eps(x, t, cond)
        return eps + 1e-7 * len(x) + 1e-7 * x.detach().mean()


def test_unchanged_weights_re_evaluate_to_the_recorded_log_probs_in_the_sampling_layout():
    backend = BatchSensitiveToyBackend()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, toy_config(sample_batch_size=4, train_batch_size=7))
    batch = trainer.sample_epoch(0)
    assert torch.equal(trainer.current_logprobs(batch), batch.traj.logp)   # packed 7 at a time: ~1e-6 off
    metrics = trainer.train_epoch(0)
    assert metrics["onpolicy_max_diff"] == 0.0


def test_micro_batches_follow_sampling_batches_and_never_exceed_the_train_batch_size():
    assert micro_batches(torch.arange(0), torch.arange(0), 4, 2) == micro_batches(torch.arange(0), torch.arange(0), 2, 4) == []
    rows = torch.arange(12).repeat_interleave(3)          # 12 rows x steps 0, 2, 4, row-major
    steps = torch.tensor([0, 2, 4]).repeat(12)
    for sample_size, train_size in ((4, 7), (4, 4), (3, 3), (4, 2), (5, 3)):
        pieces = micro_batches(rows, steps, sample_size, train_size)
        assert sorted(torch.cat(pieces).tolist()) == list(range(len(rows)))
        assert max(len(piece) for piece in pieces) <= train_size
        if train_size >= sample_size:
            for piece in pieces:
                assert len(set(steps[piece].tolist())) == 1
                assert rows[piece].tolist() == list(range(rows[piece][0].item(), rows[piece][0].item() + len(piece)))
                assert rows[piece][0].item() % sample_size == 0 and len(piece) == min(sample_size, 12 - rows[piece][0].item())


def test_training_calls_stay_within_the_train_batch_size():
    backend = BatchSensitiveToyBackend()
    trainer = Trainer(backend, BrightnessReward(), PROMPTS,
                      toy_config(sample_batch_size=4, train_batch_size=3, updates_per_epoch=2))
    batch = trainer.sample_epoch(0)
    backend.calls.clear()
    batch.rewards, _ = trainer.score(batch)
    trainer.update(batch, 0)
    assert backend.calls and max(backend.calls) <= 2 * 3        # CFG: two branches per row
