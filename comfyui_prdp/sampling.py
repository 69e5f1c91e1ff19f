"""The policy: a DDPM (DDIM with eta > 0) sampler with classifier-free guidance that records
per-step log-probabilities, and re-evaluates them for recorded transitions under other weights.

All formulas are in variance-preserving form (spec section 1). Log-probs are float64 whatever
dtype the model computes in: the paper's clip range (1e-6) is only a few float32 ulps of a
mean-reduced log-prob. Sampling and re-evaluation share `guided_step_distribution`, so a
recorded transition re-evaluated with unchanged weights gives the recorded log-prob.

Sampling can also evaluate the frozen base model at every visited x_t (`with_reference`):
that gives the reference log-probs at no extra model cost (the same evaluations a separate
pass would make) and the exact per-step KL between the two Gaussians, which share sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .backends.base import Backend, Cond

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Descending timesteps [T] and their previous (less noisy) timesteps [T] ("leading"
    spacing with offset 1, as diffusers' DDIMScheduler for Stable Diffusion). A previous
    timestep of -1 means "the final step": its alpha is alphas_cumprod[0]."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps}: must be between 1 and {num_train_timesteps}")
    ratio = num_train_timesteps // steps
    offset = 1 if (steps - 1) * ratio + 1 < num_train_timesteps else 0
    timesteps = (torch.arange(steps - 1, -1, -1) * ratio + offset).long()
    previous = timesteps - ratio
    previous = torch.where(previous < 0, torch.full_like(previous, -1), previous)
    return timesteps, previous


def alpha_pair(alphas_cumprod: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
    """(a_t, a_prev) as float32 tensors [n] for timesteps t and previous timesteps t_prev."""
    alphas = alphas_cumprod.to(torch.float64)
    a_t = alphas[t.cpu()]
    a_p = torch.where(t_prev.cpu() >= 0, alphas[t_prev.cpu().clamp(min=0)], alphas[0])
    return a_t, a_p


def check_eta(eta: float) -> None:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 < eta <= 1):
        raise ValueError(f"eta={eta}: must be in (0, 1] (1 = DDPM; 0 is deterministic DDIM, which has "
                         "no log-probs; above 1 the DDIM variance formula is no longer valid)")


def step_distribution(eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, a_p: torch.Tensor,
                      eta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (float32) and std (float64, broadcastable) of p(x_prev | x_t) for the DDIM-eta step.
    a_t, a_p: float64 [n]."""
    check_eta(eta)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    f64_device = x_t.device if x_t.device.type != "mps" else torch.device("cpu")
    a_t = a_t.to(f64_device, torch.float64).view(shape)
    a_p = a_p.to(f64_device, torch.float64).view(shape)
    variance = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    sigma = eta * variance.clamp(min=0).sqrt()
    on_model = (lambda v: v.float().to(x_t.device))
    x0_hat = (x_t - on_model((1 - a_t).sqrt()) * eps) / on_model(a_t.sqrt())
    direction = on_model((1 - a_p - sigma ** 2).clamp(min=0).sqrt())
    mean = on_model(a_p.sqrt()) * x0_hat + direction * eps
    return mean, sigma


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     reduce: str = "mean") -> torch.Tensor:
    """Per-sample log-density (float64) of N(mean, std^2) at x, reduced over all non-batch dims."""
    x, mean, std = (as_float64(v) for v in (x, mean, std))
    elementwise = (-((x - mean) ** 2) / (2 * std ** 2) - std.log() - LOG_SQRT_2PI)
    return reduce_elements(elementwise, reduce)


def as_float64(value: torch.Tensor) -> torch.Tensor:
    """float64 copy, on the CPU for devices without float64 (Apple MPS). Differentiable."""
    if value.device.type == "mps":
        value = value.cpu()
    return value.double()


def reduce_elements(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """Mean or sum over all non-batch dims."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r}: use 'mean' or 'sum'")
    dims = tuple(range(1, values.dim()))
    return values.mean(dim=dims) if reduce == "mean" else values.sum(dim=dims)


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor,
                         reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample (float64), reduced like the log-prob:
    sum (or mean) over elements of (mean_p - mean_q)^2 / (2 std^2)."""
    mean_p, mean_q, std = (as_float64(v) for v in (mean_p, mean_q, std))
    elementwise = (mean_p - mean_q) ** 2 / (2 * std ** 2)
    return reduce_elements(elementwise.expand(mean_p.shape), reduce)


def concat_cond(a: Cond, b: Cond) -> Cond:
    if a.keys() != b.keys():
        raise ValueError(f"conditionings have different keys: {sorted(a)} vs {sorted(b)}")
    return {key: torch.cat([a[key], b[key]]) for key in a}


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    return {key: value[index.to(value.device)] for key, value in cond.items()}


def guided_eps(backend: Backend, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
               cfg: float) -> torch.Tensor:
    """CFG-combined noise prediction in float32: eps_u + w * (eps_c - eps_u)."""
    if cfg == 1.0:
        return backend.predict_eps(x, t, cond).float()
    both = backend.predict_eps(torch.cat([x, x]), torch.cat([t, t]), concat_cond(uncond, cond)).float()
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + cfg * (eps_cond - eps_uncond)


def guided_step_distribution(backend: Backend, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                             cond: Cond, uncond: Cond, *, cfg: float, eta: float):
    """(mean, std) of the sampler's transition at x_t under the backend's current weights."""
    eps = guided_eps(backend, x_t.to(backend.dtype), t.to(backend.device), cond, uncond, cfg)
    a_t, a_p = alpha_pair(backend.alphas_cumprod, t, t_prev)
    return step_distribution(eps, x_t.float(), a_t, a_p, eta)


def transition_logprob(backend: Backend, x_t: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor,
                       t_prev: torch.Tensor, cond: Cond, uncond: Cond, *, cfg: float, eta: float,
                       reduce: str = "mean") -> torch.Tensor:
    """log p(x_prev | x_t, c) [n] of recorded transitions under the backend's current weights.
    Differentiable with respect to the model's trainable parameters."""
    mean, std = guided_step_distribution(backend, x_t, t, t_prev, cond, uncond, cfg=cfg, eta=eta)
    return gaussian_logprob(x_prev.to(mean.device), mean, std, reduce)


@dataclass
class Trajectories:
    """Recorded sampling trajectories (VP latents on the CPU).

    latents [n, T+1, C, h, w]: latents[:, 0] is the initial noise, latents[:, -1] the sample.
    logp [n, T]: float64 log-prob of each transition under the sampling weights.
    timesteps, prev_timesteps [T]: the schedule.
    logp_ref, kl [n, T] (float64, only when sampled `with_reference`): the transition's log-prob
    under the base model, and the exact KL(sampling step || base step) at each visited x_t.
    """

    latents: torch.Tensor
    logp: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    logp_ref: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def cpu_noise(n: int, shape: Sequence[int], generator) -> torch.Tensor:
    """Standard normal noise [n, *shape] made on the CPU. `generator` is one torch.Generator
    for the batch, or a list of n (one per row: each row then depends only on its own seed)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} rows")
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn((n, *shape), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_trajectories(backend: Backend, cond: Cond, uncond: Cond, *, steps: int, cfg: float,
                        eta: float, latent_shape: Sequence[int], generator: torch.Generator,
                        reduce: str = "mean", on_step=None, with_reference: bool = False) -> Trajectories:
    """Sample one trajectory per row of `cond` (uncond has the same batch size).

    Noise comes from `generator` on the CPU (see `cpu_noise`), so a seed gives the same
    images on any device. With `with_reference`, the base model (adapters disabled) is
    evaluated at each visited x_t too, filling `logp_ref` and `kl`.
    `on_step(i, T)` is called after each denoising step.
    """
    check_eta(eta)
    n = next(iter(cond.values())).shape[0]
    timesteps, previous = ddim_timesteps(len(backend.alphas_cumprod), steps)
    x = cpu_noise(n, latent_shape, generator)
    latents = [x]
    logps: List[torch.Tensor] = []
    logps_ref: List[torch.Tensor] = []
    kls: List[torch.Tensor] = []
    device = backend.device
    x = x.to(device)
    for i in range(steps):
        t = timesteps[i].repeat(n)
        t_prev = previous[i].repeat(n)
        mean, std = guided_step_distribution(backend, x, t, t_prev, cond, uncond, cfg=cfg, eta=eta)
        noise = cpu_noise(n, latent_shape, generator).to(device)
        x_prev = mean + std.float().to(device) * noise
        logps.append(gaussian_logprob(x_prev, mean, std, reduce).cpu())
        if with_reference:
            with backend.adapters_disabled():
                mean_ref, _ = guided_step_distribution(backend, x, t, t_prev, cond, uncond, cfg=cfg, eta=eta)
            logps_ref.append(gaussian_logprob(x_prev, mean_ref, std, reduce).cpu())
            kls.append(gaussian_kl_same_std(mean, mean_ref, std, reduce).cpu())
        latents.append(x_prev.cpu())
        x = x_prev
        if on_step is not None:
            on_step(i + 1, steps)
    stacked = (lambda values: torch.stack(values, dim=1) if values else None)
    return Trajectories(torch.stack(latents, dim=1), stacked(logps), timesteps, previous,
                        logp_ref=stacked(logps_ref), kl=stacked(kls))


def repeat_cond(cond: Cond, repeats: int) -> Cond:
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in cond.items()}


def broadcast_row(row: Cond, n: int) -> Cond:
    """The first row of `row` repeated to n rows; used for the negative prompt."""
    return {key: value[:1].expand(n, *value.shape[1:]).contiguous() for key, value in row.items()}
