"""The DDPM policy's SDE window (policies/ddpm.py): steps outside [first, stop) are deterministic
DDIM (eta 0) steps with no log-prob, the window's steps are DDIM-eta steps that are trained.

The deterministic step is written out here from the DDIM equations in float64:
    x_prev = sqrt(a_p) x0_hat + sqrt(1 - a_p) eps,  x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
with eps the CFG-combined noise prediction and a_p = alphas_cumprod[0] for the final step.
"""
import pytest
import torch

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.policies import DDPMPolicy, policy_for
from comfyui_prdp.sampling import sample_trajectories
from toy_backend import ToyBackend


def leading_timesteps(steps):
    ratio = 1000 // steps
    times = [(steps - 1 - i) * ratio + 1 for i in range(steps)]
    return times, [t - ratio if t - ratio >= 0 else -1 for t in times]


def literal_ddim(backend, x, t, t_prev, cond, uncond, cfg):
    alphas = backend.alphas_cumprod.double()
    a_t = alphas[t]
    a_p = alphas[t_prev] if t_prev >= 0 else alphas[0]
    times = torch.full((len(x),), t, dtype=torch.long)
    eps_c = backend.predict_eps(x, times, cond).double()
    eps_u = backend.predict_eps(x, times, uncond).double()
    eps = eps_u + cfg * (eps_c - eps_u)
    x0_hat = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_p.sqrt() * x0_hat + (1 - a_p).sqrt() * eps


def sample(policy, steps=8, cfg=2.0, n=3, seed=0):
    backend = ToyBackend()
    with torch.no_grad():
        backend.lora.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cond = backend.encode_prompts([f"prompt {i}" for i in range(n)])
    uncond = backend.encode_prompts([""] * n)
    traj = sample_trajectories(backend, cond, uncond, steps=steps, cfg=cfg, policy=policy,
                               latent_shape=backend.latent_shape(32, 32),
                               generator=torch.Generator().manual_seed(seed))
    return backend, traj, cond, uncond


def test_steps_outside_the_window_are_deterministic_ddim_and_only_the_window_is_trained():
    steps, cfg = 8, 2.0
    backend, traj, cond, uncond = sample(DDPMPolicy(1.0, window=(2, 5)), steps=steps, cfg=cfg)
    times, previous = leading_timesteps(steps)
    assert traj.steps.tolist() == [2, 3, 4] and traj.logp.shape == (3, 3)
    assert traj.timesteps.tolist() == times[2:5] and traj.prev_timesteps.tolist() == previous[2:5]
    for i in range(steps):
        x = traj.latents[:, i]
        expected = literal_ddim(backend, x, times[i], previous[i], cond, uncond, cfg)
        gap = (traj.latents[:, i + 1].double() - expected).abs().max().item()
        if i in (2, 3, 4):
            assert gap > 1e-2, f"step {i} is in the window: it must add noise"
        else:
            assert gap < 1e-5, f"step {i} is outside the window: deterministic DDIM expected, off by {gap}"
    assert torch.isfinite(traj.logp).all()


def test_a_window_over_every_step_is_the_plain_ddpm_policy():
    _, plain, _, _ = sample(DDPMPolicy(0.8))
    _, full, _, _ = sample(DDPMPolicy(0.8, window=(0, 8)))
    assert full.steps.tolist() == list(range(8))
    assert torch.equal(plain.latents, full.latents) and torch.equal(plain.logp, full.logp)


def test_the_config_window_reaches_the_ddpm_policy_and_counts_only_its_steps():
    config = TrainConfig(policy="ddpm", steps=8, sde_window=[0, 3], prompts_per_epoch=2, images_per_prompt=4,
                         cfg=3.0).validate()
    policy = policy_for(config, ToyBackend())
    assert isinstance(policy, DDPMPolicy) and policy.window == (0, 3)
    assert policy_for(config.replace(policy="auto").validate(), ToyBackend()).window == (0, 3)
    assert config.stochastic_steps() == 3
    counts = config.model_evaluations_per_epoch()
    assert counts["sampling"] == 8 * 8 * 2 and counts["update_forward_backward"] == 8 * 3 * 2
    assert counts["reference"] == 8 * 3 * 2


RANGE = r"sde_window=.*0 <= first < stop <= 8"


@pytest.mark.parametrize("window, match", [([0, 9], RANGE), ([3, 3], RANGE), ([-1, 2], RANGE), ([1], RANGE),
                                           ([0.5, 2], r"sde_window\[0\]=0.5: must be a whole number"),
                                           ([True, 2], "sde_window")])
def test_bad_ddpm_windows_are_refused_with_the_range(window, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(policy="ddpm", steps=8, sde_window=window).validate()


def test_ddpm_may_end_its_window_at_the_last_step_flow_may_not():
    TrainConfig(policy="ddpm", steps=8, sde_window=[4, 8]).validate()
    with pytest.raises(ValueError, match="last flow step is deterministic"):
        TrainConfig(policy="flow_sde", steps=8, sde_window=[4, 8]).validate()
    with pytest.raises(ValueError, match="sde_window"):
        DDPMPolicy(1.0, window=(4, 9)).schedule(ToyBackend(), 8)


def test_auto_checks_the_window_against_the_policy_the_model_selects():
    from toy_flow_backend import ToyFlowBackend

    config = TrainConfig(steps=8, sde_window=[4, 8]).validate()      # 'auto': fine for a VP model
    assert policy_for(config, ToyBackend()).window == (4, 8)
    with pytest.raises(ValueError, match=r"sde_window=\[4, 8\].*'flow_sde'.*stop <= 7"):
        policy_for(config, ToyFlowBackend())


def test_a_batch_mixing_window_and_deterministic_steps_is_refused():
    backend = ToyBackend()
    policy = DDPMPolicy(1.0, window=(0, 2))
    schedule = policy.schedule(backend, 4)
    x = torch.randn(2, *backend.latent_shape(32, 32))
    with pytest.raises(ValueError, match="mixes stochastic and deterministic"):
        policy.transition(torch.zeros_like(x), "eps", x, schedule, torch.tensor([1, 2]), backend)
