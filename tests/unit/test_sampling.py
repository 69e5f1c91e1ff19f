"""The sampler's schedule and log-probs, checked against independent computations."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from comfyui_prdp.sampling import (ddim_timesteps, gaussian_logprob, sample_trajectories,
                                   step_distribution, transition_logprob)
from toy_backend import ToyBackend, sd_alphas_cumprod


def sd_scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("steps", [1, 8, 20, 50])
def test_timesteps_match_diffusers_ddim(steps):
    scheduler = sd_scheduler()
    scheduler.set_timesteps(steps)
    timesteps, previous = ddim_timesteps(1000, steps)
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    assert (previous == timesteps - 1000 // steps).logical_or(previous == -1).all()


def test_step_mean_and_std_match_diffusers_ddim_eta1():
    scheduler = sd_scheduler()
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    eps = torch.randn(3, 4, 8, 8)
    timesteps, previous = ddim_timesteps(1000, 10)
    alphas = sd_alphas_cumprod()
    for i in (0, 4, 9):
        t, t_prev = timesteps[i], previous[i]
        a_t = alphas[t].repeat(3)
        a_p = (alphas[t_prev] if t_prev >= 0 else alphas[0]).repeat(3)
        mean, std = step_distribution(eps, x, a_t, a_p, eta=1.0)
        expected_mean = scheduler.step(eps, int(t), x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        expected_std = scheduler._get_variance(int(t), int(t_prev)).sqrt()
        assert torch.allclose(mean, expected_mean, atol=1e-5)
        assert torch.allclose(std.flatten()[0].double(), expected_std.double(), rtol=1e-5)


def test_logprob_equals_independent_gaussian_density():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 5)
    mean = torch.randn(2, 4, 5, 5)
    std = torch.tensor([0.3, 0.05]).view(2, 1, 1, 1)
    normal = torch.distributions.Normal(mean.double(), std.double().expand_as(mean))
    expected = normal.log_prob(x.double())
    got_mean = gaussian_logprob(x, mean, std, "mean")
    got_sum = gaussian_logprob(x, mean, std, "sum")
    assert torch.allclose(got_mean.double(), expected.mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose(got_sum.double(), expected.sum(dim=(1, 2, 3)), rtol=1e-5)


def test_recorded_logprob_is_density_of_the_recorded_transition():
    backend = ToyBackend()
    shape = backend.latent_shape(32, 32)
    cond = backend.encode_prompts(["a cat", "a dog"])
    uncond = backend.encode_prompts(["", ""])
    traj = sample_trajectories(backend, cond, uncond, steps=6, cfg=4.0, eta=1.0, latent_shape=shape,
                               generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape == (2, 7, *shape) and traj.logp.shape == (2, 6)
    alphas = backend.alphas_cumprod
    step = 2
    x_t, x_prev = traj.latents[:, step], traj.latents[:, step + 1]
    t = traj.timesteps[step].repeat(2)
    with torch.no_grad():
        both = backend.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                   {"context": torch.cat([uncond["context"], cond["context"]])})
    eps = both[:2] + 4.0 * (both[2:] - both[:2])
    a_t = alphas[traj.timesteps[step]].item()
    a_p = alphas[traj.prev_timesteps[step]].item()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps
    expected = torch.distributions.Normal(mu.double(), sigma).log_prob(x_prev.double()).mean(dim=(1, 2, 3))
    assert torch.allclose(traj.logp[:, step].double(), expected, atol=1e-5)


@pytest.mark.parametrize("micro_batch", [1, 3, 12])
def test_onpolicy_reevaluation_matches_recorded(micro_batch):
    backend = ToyBackend()
    shape = backend.latent_shape(32, 32)
    cond = backend.encode_prompts(["a", "b", "c", "d"])
    uncond = backend.encode_prompts([""] * 4)
    traj = sample_trajectories(backend, cond, uncond, steps=5, cfg=3.0, eta=1.0, latent_shape=shape,
                               generator=torch.Generator().manual_seed(0))
    rows = torch.arange(4).repeat_interleave(5)
    steps = torch.arange(5).repeat(4)
    values = []
    for start in range(0, len(rows), micro_batch):
        r, s = rows[start:start + micro_batch], steps[start:start + micro_batch]
        values.append(transition_logprob(
            backend, traj.latents[r, s], traj.latents[r, s + 1], traj.timesteps[s], traj.prev_timesteps[s],
            {"context": cond["context"][r]}, {"context": uncond["context"][r]}, cfg=3.0, eta=1.0).detach())
    assert (torch.cat(values).view(4, 5) - traj.logp).abs().max() < 1e-5


def test_reevaluation_under_other_weights_differs():
    backend = ToyBackend()
    shape = backend.latent_shape(32, 32)
    cond = backend.encode_prompts(["a", "b"])
    uncond = backend.encode_prompts(["", ""])
    traj = sample_trajectories(backend, cond, uncond, steps=4, cfg=2.0, eta=1.0, latent_shape=shape,
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        backend.lora.up.normal_()
    t = traj.timesteps[1].repeat(2)
    t_prev = traj.prev_timesteps[1].repeat(2)
    changed = transition_logprob(backend, traj.latents[:, 1], traj.latents[:, 2], t, t_prev, cond, uncond,
                                 cfg=2.0, eta=1.0)
    with backend.adapters_disabled():
        base = transition_logprob(backend, traj.latents[:, 1], traj.latents[:, 2], t, t_prev, cond, uncond,
                                  cfg=2.0, eta=1.0)
    assert (changed - traj.logp[:, 1]).abs().max() > 1e-3
    assert (base - traj.logp[:, 1]).abs().max() < 1e-5


def test_per_row_generators_make_rows_independent_of_batch():
    backend = ToyBackend()
    shape = backend.latent_shape(32, 32)
    cond = backend.encode_prompts(["a", "b"])
    uncond = backend.encode_prompts(["", ""])
    both = sample_trajectories(backend, cond, uncond, steps=3, cfg=2.0, eta=1.0, latent_shape=shape,
                               generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    single = sample_trajectories(backend, {"context": cond["context"][1:]}, {"context": uncond["context"][1:]},
                                 steps=3, cfg=2.0, eta=1.0, latent_shape=shape,
                                 generator=[torch.Generator().manual_seed(6)])
    assert torch.allclose(both.final[1], single.final[0], atol=1e-5)


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_step_std_and_mean_follow_eta_like_diffusers(eta):
    scheduler = sd_scheduler()
    scheduler.set_timesteps(10)
    torch.manual_seed(2)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps, previous = ddim_timesteps(1000, 10)
    alphas = sd_alphas_cumprod()
    for i in (0, 5):
        t, t_prev = timesteps[i], previous[i]
        mean, std = step_distribution(eps, x, alphas[t].repeat(2), alphas[t_prev].repeat(2), eta=eta)
        expected_mean = scheduler.step(eps, int(t), x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        expected_std = eta * scheduler._get_variance(int(t), int(t_prev)).sqrt()
        assert torch.allclose(mean, expected_mean, atol=1e-5)
        assert std.flatten()[0].item() == pytest.approx(expected_std.item(), rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, -0.5, 1.5, float("nan")])
def test_eta_outside_zero_one_is_refused(eta):
    x = torch.zeros(1, 4, 2, 2)
    a = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"eta=.*\(0, 1\]"):
        step_distribution(x, x, a, a * 1.5, eta=eta)


def test_logprobs_are_recorded_in_float64_and_reference_matches_a_separate_pass():
    backend = ToyBackend()
    with torch.no_grad():
        backend.lora.up.normal_(std=0.05)
    shape = backend.latent_shape(32, 32)
    cond = backend.encode_prompts(["a", "b", "c"])
    uncond = backend.encode_prompts([""] * 3)
    traj = sample_trajectories(backend, cond, uncond, steps=4, cfg=2.0, eta=0.9, latent_shape=shape,
                               generator=torch.Generator().manual_seed(4), with_reference=True)
    assert traj.logp.dtype == traj.logp_ref.dtype == traj.kl.dtype == torch.float64
    for s in range(4):
        t, t_prev = traj.timesteps[s].repeat(3), traj.prev_timesteps[s].repeat(3)
        with torch.no_grad(), backend.adapters_disabled():
            ref = transition_logprob(backend, traj.latents[:, s], traj.latents[:, s + 1], t, t_prev, cond, uncond,
                                     cfg=2.0, eta=0.9)
        assert ref.dtype == torch.float64
        assert (ref - traj.logp_ref[:, s]).abs().max() < 1e-9
    assert (traj.logp - traj.logp_ref).abs().max() > 1e-3   # the LoRA has an effect
