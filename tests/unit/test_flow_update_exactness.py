"""The trainer's two-pass gradient for the flow-SDE policy equals autograd of the literal loss.

Like test_update_exactness.py for DDPM: one epoch with K=2 updates and minibatches smaller than
N (pass 1 off-policy, the on-policy skip), replayed with this file's own flow-SDE/CPS
log-densities (float64, from docs/algorithm.md section 1.2's equations) and the literal PRDP pair loss / DDPO
surrogate of test_update_exactness, full autograd over the trained steps only (the deterministic
last step and ODE steps outside an SDE window have no log-prob and are not trained; with
timestep_fraction < 1, only each minibatch's drawn steps, the gradient scaled by T / k).
"""
import math

import pytest
import torch

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.trainer import Trainer
from test_update_exactness import literal_advantages, literal_ddpo, literal_prdp
from epoch_recorder import EpochRecorder
from toy_backend import BrightnessReward
from toy_flow_backend import ToyFlowBackend, shifted_sigmas

PROMPTS = ["a red apple", "a blue sky", "a green field"]


def literal_flow_logprob(backend, x, x_next, sigma, sigma_next, sigma_1, context, uncontext, cfg, a, variant):
    """log p(x_next | x) of one flow-SDE step, float64, mean over latent elements."""
    s = torch.full((len(x),), sigma, dtype=torch.float64)
    v_c = (x.double() - backend.denoised(x, s, {"context": context}).double()) / sigma
    v_u = (x.double() - backend.denoised(x, s, {"context": uncontext}).double()) / sigma
    v = v_u + cfg * (v_c - v_u)
    x = x.double()
    dt = sigma_next - sigma
    if variant == "sde":
        std_t = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
        mean = x + v * dt + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
        std = std_t * math.sqrt(-dt)
    else:
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next ** 2 - std ** 2) * (x + (1 - sigma) * v)
    density = -(x_next.double() - mean) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.mean(dim=(1, 2, 3))


CASES = {
    "prdp-sde": dict(),
    "prdp-cps": dict(flow_sde_variant="cps"),
    "prdp-sde-window": dict(sde_window=[1, 4]),
    "ddpo-sde": dict(algorithm="ddpo", clip_range=0.02, adv_clip=1.0, ddpo_advantages="group"),
    # 3 of the 5 stochastic steps per minibatch: T % k != 0, so the gradient's T / k rescaling
    # (5/3, not 5 // 3 = 1) matters
    "prdp-sde-subsampled-steps": dict(timestep_fraction=0.6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_optimizer_step_equals_the_literal_flow_replay(case):
    base = dict(epochs=1, prompts_per_epoch=2, images_per_prompt=3, updates_per_epoch=2, minibatch_prompts=1,
                steps=6, cfg=2.5, width=32, height=32, beta=0.05, clip_range=2e-3, learning_rate=0.05,
                weight_decay=1e-3, grad_clip=1e9, sample_batch_size=4, train_batch_size=5, lora_rank=4, seed=3,
                flow_noise_level=0.7)
    base.update(CASES[case])
    cfg = TrainConfig().replace(**base).validate()
    backend = ToyFlowBackend()
    with torch.no_grad():
        backend.lora.up.copy_(0.05 * torch.randn(backend.lora.up.shape, generator=torch.Generator().manual_seed(11)))
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, cfg)
    params = backend.trainable_parameters()
    start = [p.detach().clone() for p in params]
    recorded = EpochRecorder(trainer)
    trainer.train_epoch(0)
    batch, grads, weights_after = recorded.batch, recorded.grads, recorded.weights_after

    window = cfg.sde_window or [0, cfg.steps - 1]
    trained = list(range(*window))
    T = len(trained)
    assert batch.traj.logp.shape[1] == T and batch.traj.steps.tolist() == trained
    sigmas = shifted_sigmas(cfg.steps, backend.shift)
    replica = ToyFlowBackend()
    r_params = replica.trainable_parameters()
    with torch.no_grad():
        for p, value in zip(r_params, start):
            p.copy_(value)
    N, B = cfg.prompts_per_epoch, cfg.images_per_prompt
    lat, context, uncontext = batch.traj.latents, batch.cond["context"], batch.uncond["context"]

    def logp_rows(rows, columns=range(T), *, grad, disabled=False):
        out = []
        with torch.set_grad_enabled(grad):
            replica.lora.enabled = not disabled
            try:
                for s in [trained[c] for c in columns]:
                    out.append(literal_flow_logprob(replica, lat[rows, s], lat[rows, s + 1], float(sigmas[s]),
                                                    float(sigmas[s + 1]), float(sigmas[1]), context[rows],
                                                    uncontext[rows], cfg.cfg, cfg.flow_noise_level,
                                                    cfg.flow_sde_variant))
            finally:
                replica.lora.enabled = True
        return torch.stack(out, dim=1)

    every_row = torch.arange(N * B)
    with torch.no_grad():
        logp_old, logp_ref = logp_rows(every_row, grad=False), logp_rows(every_row, grad=False, disabled=True)
    assert torch.allclose(batch.traj.logp, logp_old, atol=1e-5)
    assert torch.allclose(batch.logp_ref, logp_ref, atol=1e-5)
    rewards = batch.rewards.double().view(N, B)
    advantages = literal_advantages(rewards, cfg.ddpo_advantages)
    from comfyui_prdp.training.batches import epoch_generator
    generator = epoch_generator(cfg.seed, 0, stream=1)
    k = max(1, round(T * cfg.timestep_fraction))        # trained columns per minibatch
    if case == "prdp-sde-subsampled-steps":
        assert T % k != 0, (T, k)
    replay = []
    for _ in range(cfg.updates_per_epoch):
        order = torch.randperm(N, generator=generator)
        for first in range(0, N, cfg.minibatch_prompts):
            groups = order[first:first + cfg.minibatch_prompts]
            columns = list(range(T)) if k >= T else torch.randperm(T, generator=generator)[:k].sort().values.tolist()
            rows = (groups[:, None] * B + torch.arange(B)).reshape(-1)
            live = logp_old[rows].clone()         # the other steps keep their recorded values
            live[:, columns] = logp_rows(rows, columns, grad=True)
            G = len(groups)
            if cfg.algorithm == "prdp":
                loss = literal_prdp(live.view(G, B, T), logp_old[rows].view(G, B, T), logp_ref[rows].view(G, B, T),
                                    rewards[groups], cfg.beta, cfg.clip_range, cfg.step_reduce)
            else:
                loss = literal_ddpo(live.view(G, B, T), logp_old[rows].view(G, B, T), advantages[groups],
                                    cfg.clip_range, cfg.adv_clip)
            replay.append([(g * (T / k)).float() for g in torch.autograd.grad(loss, r_params)])
            with torch.no_grad():
                for p, value in zip(r_params, weights_after[len(replay) - 1]):
                    p.copy_(value)
    assert len(grads) == len(replay) == 4
    largest = max(g.abs().max().item() for step in replay for g in step)
    assert largest > 0                      # a test of zeros would prove nothing
    for got_step, expected_step in zip(grads, replay):
        for got, expected in zip(got_step, expected_step):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * largest)
