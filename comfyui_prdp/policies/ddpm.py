"""DDPM as DDIM with eta > 0, in variance-preserving form (docs/algorithm.md section 1.1).

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t] and t an integer training
timestep. The transition from t to t_prev is Gaussian with
    std  = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean = sqrt(a_p) * x0_hat + sqrt(1 - a_p - std^2) * eps,  x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
Every step is stochastic (eta > 0) and has a log-probability, unless a window [first, stop) is
given: then only those steps are stochastic and trained, the others deterministic DDIM (eta 0)
steps, as MixGRPO's SDE window for flow models. The trajectory log-ratio then covers the window
only: an APPROXIMATION of the PRDP trajectory objective, cheaper by the steps it leaves out
(no base-model evaluation and no update pass for them).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .base import Policy, Schedule


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
    """(a_t, a_prev) as float64 tensors [n] for timesteps t and previous timesteps t_prev."""
    alphas = alphas_cumprod.to(torch.float64)
    a_t = alphas[t.cpu().long()]
    a_p = torch.where(t_prev.cpu() >= 0, alphas[t_prev.cpu().long().clamp(min=0)], alphas[0])
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
    return _ddim_step(eps, x_t, a_t, a_p, eta)


def deterministic_step(eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, a_p: torch.Tensor) -> torch.Tensor:
    """x_prev of the deterministic DDIM step (eta 0), float32."""
    return _ddim_step(eps, x_t, a_t, a_p, 0.0)[0]


def _ddim_step(eps, x_t, a_t, a_p, eta: float):
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


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """The noise a denoised prediction implies at VP latents x_t: (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
    a_t = a_t.to(x_t.device, torch.float64).view((-1,) + (1,) * (x_t.dim() - 1))
    return (x_t - a_t.sqrt().float() * x0) / (1 - a_t).sqrt().float()


class DDPMPolicy(Policy):
    """DDIM with eta in (0, 1] over a backend's discrete VP schedule (`alphas_cumprod`)."""

    name = "ddpm"

    def __init__(self, eta: float = 1.0, window: Optional[Sequence[int]] = None):
        check_eta(eta)
        self.eta = float(eta)
        self.window = None if window is None else (int(window[0]), int(window[1]))

    def check_backend(self, backend) -> None:
        kind = getattr(backend, "sampling_kind", "vp")
        if kind != "vp":
            raise ValueError(f"policy 'ddpm' needs a variance-preserving (eps / v-prediction) model; this model "
                             f"samples with {kind} matching: use policy 'flow_sde' (or 'auto')")

    def schedule(self, backend, steps: int) -> Schedule:
        timesteps, previous = ddim_timesteps(len(backend.alphas_cumprod), steps)
        first, stop = self.window if self.window is not None else (0, steps)
        if not 0 <= first < stop <= steps:
            raise ValueError(f"sde_window={[first, stop]}: need 0 <= first < stop <= steps = {steps}")
        return Schedule(timesteps, previous, torch.arange(first, stop))

    def transition(self, prediction: torch.Tensor, kind: str, x: torch.Tensor, schedule: Schedule,
                   step: torch.Tensor, backend) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        index = step.cpu().long()
        trained = torch.isin(index, schedule.trained)
        if trained.any() and not trained.all():
            raise ValueError("a batch mixes stochastic and deterministic DDPM steps; evaluate them separately")
        a_t, a_p = alpha_pair(backend.alphas_cumprod, schedule.times[index], schedule.next_times[index])
        if kind == "x0":
            prediction = eps_from_x0(prediction, x, a_t)
        elif kind != "eps":
            raise ValueError(f"the DDPM policy takes eps or x0 predictions, not {kind!r}")
        if not trained.any():                                  # deterministic DDIM step
            return deterministic_step(prediction, x, a_t, a_p), None
        return step_distribution(prediction, x, a_t, a_p, self.eta)
