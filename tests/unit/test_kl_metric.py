"""The `kl` metric is the exact KL(p_theta_old || p_ref) of the sampled trajectories, and
`log_ratio_mean` its signed one-sample estimate; both against closed forms computed here."""
import pytest
import torch

from comfyui_prdp.sampling import gaussian_kl_same_std
from comfyui_prdp.trainer import Trainer
from test_update_exactness import PROMPTS, config, literal_logprob, literal_step, start_weights
from toy_backend import BrightnessReward, ToyBackend


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_kl_equals_torch_closed_form(reduce):
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64).view(3, 1, 1, 1)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(p.double(), std.expand_as(p)),
                                                 torch.distributions.Normal(q.double(), std.expand_as(q)))
    expected = expected.mean(dim=(1, 2, 3)) if reduce == "mean" else expected.sum(dim=(1, 2, 3))
    got = gaussian_kl_same_std(p, q, std, reduce)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_epoch_kl_metric_is_the_exact_trajectory_kl(reduce):
    cfg = config(logprob_reduce=reduce, updates_per_epoch=1)
    backend = ToyBackend()
    start_weights(backend)
    trainer = Trainer(backend, BrightnessReward(), PROMPTS, cfg)
    seen = {}
    original = trainer.update
    trainer.update = lambda batch, epoch: (seen.setdefault("batch", batch), original(batch, epoch))[1]
    replica = ToyBackend()
    start_weights(replica)
    metrics = trainer.train_epoch(0)
    batch = seen["batch"]
    lat, T = batch.traj.latents, cfg.steps
    n = lat.shape[0]
    kl = torch.zeros(n, dtype=torch.float64)
    log_ratio = torch.zeros(n, dtype=torch.float64)
    for s in range(T):
        args = (lat[:, s], batch.traj.timesteps[s].repeat(n), batch.traj.prev_timesteps[s].repeat(n),
                batch.cond["context"], batch.uncond["context"], cfg.cfg, cfg.eta)
        with torch.no_grad():
            mu, sigma = literal_step(replica, *args)
            replica.lora.enabled = False
            mu_ref, _ = literal_step(replica, *args)
            replica.lora.enabled = True
        per_element = (mu - mu_ref) ** 2 / (2 * sigma ** 2)
        kl += per_element.mean(dim=(1, 2, 3)) if reduce == "mean" else per_element.sum(dim=(1, 2, 3))
        with torch.no_grad():
            logp = literal_logprob(replica, lat[:, s], lat[:, s + 1], *args[1:3], *args[3:5], cfg.cfg, cfg.eta, reduce)
            replica.lora.enabled = False
            logp_ref = literal_logprob(replica, lat[:, s], lat[:, s + 1], *args[1:3], *args[3:5], cfg.cfg, cfg.eta,
                                       reduce)
            replica.lora.enabled = True
        log_ratio += logp - logp_ref
    assert kl.mean().item() > 1e-4, "the LoRA must move the model for this test to mean anything"
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert metrics["log_ratio_mean"] == pytest.approx(log_ratio.mean().item(), rel=1e-3, abs=1e-6)


def test_kl_is_zero_without_a_lora_effect():
    cfg = config(updates_per_epoch=1)
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, cfg)   # lora.up == 0: policy == base
    metrics = trainer.train_epoch(0)
    assert metrics["kl"] == 0.0 and metrics["log_ratio_mean"] == 0.0
