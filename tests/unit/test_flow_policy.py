"""The flow-SDE policy (policies/flow_sde.py) against docs/algorithm.md section 1.2, written out here.

Every expected value is computed from those equations in float64 in this file: the
Flow-GRPO SDE step (std at sigma = 1 with sigmas[1] in the denominator), the CPS step, the
Gaussian log-density reduced over latent elements, the deterministic (ODE) last step and the
ODE steps outside an SDE window.
"""
import math

import pytest
import torch

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.policies import DDPMPolicy, FlowSDEPolicy, policy_for
from comfyui_prdp.sampling import recorded_logprob, sample_trajectories
from toy_backend import ToyBackend
from toy_flow_backend import ToyFlowBackend, shifted_sigmas


def spec_sde(x, v, sigma, sigma_next, sigma_1, a):
    """(mean, std) of Flow-GRPO's SDE step, float64."""
    x, v = x.double(), v.double()
    dt = sigma_next - sigma
    std_t = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
    mean = x + v * dt + (std_t ** 2 / (2 * sigma)) * (x + (1 - sigma) * v) * dt
    return mean, std_t * math.sqrt(-dt)


def spec_cps(x, v, sigma, sigma_next, a):
    x, v = x.double(), v.double()
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    return (1 - sigma_next) * x0_hat + math.sqrt(sigma_next ** 2 - std ** 2) * x1_hat, std


def spec_logp(x_next, mean, std):
    """Mean over latent elements of the Gaussian log-density, float64."""
    density = -(x_next.double() - mean) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.mean(dim=(1, 2, 3))


def guided_velocity(backend, x, sigma, cond, uncond, cfg):
    """v = (x - x0) / sigma from the toy model's denoised output, CFG in velocity space."""
    s = torch.full((len(x),), sigma, dtype=torch.float64)
    v_c = (x.double() - backend.denoised(x, s, cond).double()) / sigma
    v_u = (x.double() - backend.denoised(x, s, uncond).double()) / sigma
    return v_u + cfg * (v_c - v_u)


def sample(backend, policy, steps=6, cfg=2.0, n=3, seed=0, **kwargs):
    cond = backend.encode_prompts([f"prompt {i}" for i in range(n)])
    uncond = backend.encode_prompts([""] * n)
    traj = sample_trajectories(backend, cond, uncond, steps=steps, cfg=cfg, policy=policy,
                               latent_shape=backend.latent_shape(32, 32),
                               generator=torch.Generator().manual_seed(seed), **kwargs)
    return traj, cond, uncond


def start_weights(backend, scale=0.05):
    with torch.no_grad():
        backend.lora.up.copy_(scale * torch.randn(backend.lora.up.shape, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("a", [0.7, 0.3])
@pytest.mark.parametrize("step", [0, 2, 4])
def test_sde_mean_and_std_follow_the_spec(a, step):
    steps, shift = 6, 3.0
    sigmas = shifted_sigmas(steps, shift)
    backend = ToyFlowBackend(shift=shift)
    policy = FlowSDEPolicy(noise_level=a)
    schedule = policy.schedule(backend, steps)
    torch.manual_seed(step)
    x, v = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    mean, std = policy.transition(v, "velocity", x, schedule, torch.full((2,), step))
    sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
    expected_mean, expected_std = spec_sde(x, v, sigma, sigma_next, float(sigmas[1]), a)
    assert mean.dtype == torch.float32 and std.dtype == torch.float64
    assert torch.allclose(mean.double(), expected_mean, atol=1e-5)
    assert std.flatten()[0].item() == pytest.approx(expected_std, rel=1e-12)
    assert math.isfinite(expected_std) and expected_std > 0     # sigma = 1 is finite via sigmas[1]


class NearlyOneFlowBackend(ToyFlowBackend):
    """A schedule whose first sigma is off 1 by float rounding (a float32 model schedule)."""

    def __init__(self, first, **kwargs):
        super().__init__(**kwargs)
        self.first = first

    def flow_sigmas(self, steps):
        sigmas = super().flow_sigmas(steps).clone()
        sigmas[0] = self.first
        return sigmas


@pytest.mark.parametrize("first", [1 - 1e-7, 1 + 1e-7, 1 - 9e-7])
def test_a_first_sigma_within_rounding_of_one_is_one(first):
    steps, shift, a = 6, 3.0, 0.7
    sigmas = shifted_sigmas(steps, shift)
    policy = FlowSDEPolicy(noise_level=a)
    schedule = policy.schedule(NearlyOneFlowBackend(first, shift=shift), steps)
    x, v = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    mean, std = policy.transition(v, "velocity", x, schedule, torch.full((2,), 0))
    expected_mean, expected_std = spec_sde(x, v, 1.0, float(sigmas[1]), float(sigmas[1]), a)
    assert std.flatten()[0].item() == pytest.approx(expected_std, rel=1e-12)     # ~0.6, not ~2200 * sqrt(-dt)
    assert torch.allclose(mean.double(), expected_mean, atol=1e-5)
    assert float(schedule.times[0]) == 1.0 and torch.equal(schedule.times[1:], sigmas[1:-1])
    with pytest.raises(ValueError, match="descend strictly from 1 to 0"):
        policy.schedule(NearlyOneFlowBackend(1 - 1e-5, shift=shift), steps)


@pytest.mark.parametrize("a", [0.7, 1.0])
@pytest.mark.parametrize("step", [0, 3])
def test_cps_mean_and_std_follow_the_spec(a, step):
    steps = 5
    sigmas = shifted_sigmas(steps, 3.0)
    policy = FlowSDEPolicy(noise_level=a, variant="cps")
    schedule = policy.schedule(ToyFlowBackend(), steps)
    torch.manual_seed(10 + step)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    mean, std = policy.transition(v, "velocity", x, schedule, torch.full((3,), step))
    expected_mean, expected_std = spec_cps(x, v, float(sigmas[step]), float(sigmas[step + 1]), a)
    assert torch.allclose(mean.double(), expected_mean, atol=1e-5)
    assert std.flatten()[0].item() == pytest.approx(expected_std, rel=1e-12)


def test_x0_and_velocity_predictions_give_the_same_step():
    """ComfyUI predicts x0, diffusers the velocity: the policy converts v = (x - x0) / sigma."""
    policy = FlowSDEPolicy()
    schedule = policy.schedule(ToyFlowBackend(), 6)
    torch.manual_seed(3)
    x, x0 = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    sigma = float(schedule.times[2])
    from_x0, std_a = policy.transition(x0, "x0", x, schedule, torch.full((2,), 2))
    from_v, std_b = policy.transition((x - x0) / sigma, "velocity", x, schedule, torch.full((2,), 2))
    assert torch.allclose(from_x0, from_v, atol=1e-5) and torch.equal(std_a, std_b)
    with pytest.raises(ValueError, match="eps"):
        policy.transition(x0, "eps", x, schedule, torch.full((2,), 2))


@pytest.mark.parametrize("variant", ["sde", "cps"])
@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_recorded_logprobs_are_the_spec_density_and_the_last_step_is_deterministic(variant, prediction):
    steps, cfg, a = 6, 2.5, 0.7
    backend = ToyFlowBackend(prediction=prediction)
    start_weights(backend)
    traj, cond, uncond = sample(backend, FlowSDEPolicy(a, variant), steps=steps, cfg=cfg)
    sigmas = shifted_sigmas(steps, backend.shift)
    assert traj.latents.shape[1] == steps + 1 and traj.logp.shape == (3, steps - 1)
    assert traj.steps.tolist() == list(range(steps - 1)) and traj.logp.dtype == torch.float64
    for i in range(steps - 1):
        x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
        v = guided_velocity(backend, x, float(sigmas[i]), cond, uncond, cfg)
        if variant == "sde":
            mean, std = spec_sde(x, v, float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1]), a)
        else:
            mean, std = spec_cps(x, v, float(sigmas[i]), float(sigmas[i + 1]), a)
        assert torch.allclose(traj.logp[:, i], spec_logp(x_next, mean, std), atol=1e-4)
    x, last = traj.latents[:, -2], float(sigmas[-2])
    v = guided_velocity(backend, x, last, cond, uncond, cfg)
    assert torch.allclose(traj.final.double(), x.double() - last * v, atol=1e-5)   # x0_hat, no noise


@pytest.mark.parametrize("variant", ["sde", "cps"])
@pytest.mark.parametrize("micro_batch", [1, 4, 15])
def test_onpolicy_reevaluation_matches_recorded(variant, micro_batch):
    backend = ToyFlowBackend()
    start_weights(backend)
    traj, cond, uncond = sample(backend, FlowSDEPolicy(0.7, variant), steps=6, n=3, with_reference=True)
    columns = traj.logp.shape[1]
    rows = torch.arange(3).repeat_interleave(columns)
    cols = torch.arange(columns).repeat(3)
    values = []
    for start in range(0, len(rows), micro_batch):
        r, c = rows[start:start + micro_batch], cols[start:start + micro_batch]
        values.append(recorded_logprob(backend, traj, r, c, {"context": cond["context"][r]},
                                       {"context": uncond["context"][r]}, cfg=2.0))
    assert (torch.cat(values).view(3, columns) - traj.logp).abs().max() < 1e-5
    with backend.adapters_disabled():
        ref = recorded_logprob(backend, traj, rows, cols, {"context": cond["context"][rows]},
                               {"context": uncond["context"][rows]}, cfg=2.0)
    # float32 model outputs in another batch layout: ~1e-8 apart on some CPUs
    assert (ref.view(3, columns) - traj.logp_ref).abs().max() < 1e-6
    assert (traj.logp - traj.logp_ref).abs().max() > 1e-4          # the LoRA has an effect
    assert (traj.kl >= 0).all() and traj.kl.shape == traj.logp.shape


def test_sde_window_samples_ode_steps_outside_it_and_trains_only_inside():
    steps, window = 8, (2, 5)
    backend = ToyFlowBackend()
    traj, cond, uncond = sample(backend, FlowSDEPolicy(0.7, window=window), steps=steps, cfg=1.0)
    sigmas = shifted_sigmas(steps, backend.shift)
    assert traj.steps.tolist() == [2, 3, 4] and traj.logp.shape == (3, 3)
    assert torch.allclose(traj.timesteps, sigmas[2:5]) and torch.allclose(traj.prev_timesteps, sigmas[3:6])
    for i in [0, 1, 5, 6, 7]:                                    # Euler ODE steps: x + v dt
        x = traj.latents[:, i]
        v = guided_velocity(backend, x, float(sigmas[i]), cond, cond, 1.0)
        expected = x.double() + v * float(sigmas[i + 1] - sigmas[i])
        assert torch.allclose(traj.latents[:, i + 1].double(), expected, atol=1e-5), i
    x = traj.latents[:, 3]
    v = guided_velocity(backend, x, float(sigmas[3]), cond, cond, 1.0)
    ode = x.double() + v * float(sigmas[4] - sigmas[3])
    assert (traj.latents[:, 4].double() - ode).abs().max() > 1e-2    # inside the window: noise


def test_policies_refuse_the_wrong_model_kind_and_bad_options():
    with pytest.raises(ValueError, match="flow_sde"):
        sample(ToyFlowBackend(), DDPMPolicy(1.0))
    with pytest.raises(ValueError, match="ddpm"):
        sample(ToyBackend(), FlowSDEPolicy())
    with pytest.raises(ValueError, match="at least 2 steps"):
        FlowSDEPolicy().schedule(ToyFlowBackend(), 1)
    with pytest.raises(ValueError, match="sde_window"):
        FlowSDEPolicy(window=(3, 8)).schedule(ToyFlowBackend(), 8)
    with pytest.raises(ValueError, match="flow_noise_level"):
        FlowSDEPolicy(noise_level=0.0)
    with pytest.raises(ValueError, match="flow_sde_variant"):
        FlowSDEPolicy(variant="dance")


def test_auto_policy_follows_the_model_and_config_options_reach_it():
    config = TrainConfig(flow_noise_level=0.4, flow_sde_variant="cps", sde_window=[1, 3], steps=6).validate()
    flow = policy_for(config, ToyFlowBackend())
    assert isinstance(flow, FlowSDEPolicy) and (flow.noise_level, flow.variant, flow.window) == (0.4, "cps", (1, 3))
    vp = policy_for(TrainConfig(eta=0.8).validate(), ToyBackend())
    assert isinstance(vp, DDPMPolicy) and vp.eta == 0.8
    with pytest.raises(ValueError, match="flow_sde"):
        policy_for(TrainConfig(policy="ddpm").validate(), ToyFlowBackend())


@pytest.mark.parametrize("bad, match", [(dict(policy="euler"), "policy="), (dict(flow_noise_level=1.5), "flow_noise_level"),
                                        (dict(flow_sde_variant="x"), "flow_sde_variant"),
                                        (dict(sde_window=[0, 21]), "sde_window"),
                                        (dict(sde_window=[0.5, 2]), "sde_window"),
                                        (dict(flow_guidance=-1.0), "flow_guidance"),
                                        (dict(flow_guidance=float("nan")), "flow_guidance")])
def test_config_validates_the_policy_options(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**bad).validate()


@pytest.mark.parametrize("name, steps, branches", [("consumer-gpu-flux", 16, 1), ("consumer-gpu-sd35", 20, 2)])
def test_flow_presets_use_the_flow_policy_and_count_only_stochastic_steps(name, steps, branches):
    from comfyui_prdp.config import preset

    config = preset(name)
    assert config.policy == "flow_sde" and config.steps == steps and (config.cfg == 1.0) == (branches == 1)
    assert config.flow_guidance == (3.5 if name == "consumer-gpu-flux" else None)   # Flux.1-dev: guidance, cfg 1
    trajectories = config.prompts_per_epoch * config.images_per_prompt
    assert config.model_evaluations_per_epoch() == {
        "sampling": trajectories * steps * branches,
        "reference": trajectories * (steps - 1) * branches,        # the deterministic last step has none
        # pass 1 (no grad) for every minibatch but the epoch's first (one prompt of two here)
        "update_forward_no_grad": trajectories // 2 * (steps - 1) * branches,
        "update_forward_backward": trajectories * (steps - 1) * branches}
    assert config.minibatch_prompts * 2 == config.prompts_per_epoch
    windowed = config.replace(sde_window=[2, 6]).validate()
    assert windowed.model_evaluations_per_epoch()["update_forward_backward"] == trajectories * 4 * branches
