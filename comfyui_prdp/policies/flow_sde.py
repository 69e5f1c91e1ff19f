"""Flow matching as a stochastic policy: Flow-GRPO's SDE, its CPS variant, an SDE window.

Conventions (docs/algorithm.md section 1.2): x_sigma = (1 - sigma) x0 + sigma noise, sigma from 1 (noise) to
0 (data), velocity v = noise - x0. Step i goes from sigma = sigmas[i] to sigma' = sigmas[i+1],
dt = sigma' - sigma < 0. The schedule is the backend's (`Backend.flow_sigmas`: the model's own
shift). With noise level a:

  "sde" (Flow-GRPO's default): std_t = a sqrt(sigma / (1 - sigma)) (at sigma = 1 the denominator
        uses sigmas[1]); mean = x + v dt + std_t^2 / (2 sigma) (x + (1 - sigma) v) dt;
        std = std_t sqrt(-dt).
  "cps" (coefficients-preserving): std = sigma' sin(a pi / 2);
        mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat with x0_hat = x - sigma v,
        x1_hat = x + (1 - sigma) v.

The last step (to sigma' = 0) is a deterministic ODE step x' = x + v dt = x0_hat, with no
log-probability. With an SDE window (MixGRPO) only the window's steps are stochastic and
trained; the others are ODE steps: cheaper, but the trajectory log-ratio then covers the
window only, so it is an APPROXIMATION of the PRDP trajectory objective.
Means are computed in float32 from float64 coefficients; log-probs are float64 (sampling.py).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .base import Policy, Schedule, on_model, per_row

VARIANTS = ("sde", "cps")


def check_flow_options(noise_level: float, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"flow_sde_variant={variant!r}: use 'sde' (Flow-GRPO) or 'cps' (coefficients-preserving)")
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and 0 < noise_level <= 1):
        raise ValueError(f"flow_noise_level={noise_level}: must be in (0, 1] (Flow-GRPO uses 0.7; 0 would be "
                         "the deterministic ODE, which has no log-probs)")


def check_flow_sigmas(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """float64 [steps + 1], 1 -> 0 strictly descending, or a ValueError naming the problem.

    A first sigma within 1e-6 of 1 (float32 rounding of a model's schedule) is set to exactly 1:
    the SDE's std_t = a sqrt(sigma / (1 - sigma)) uses sigmas[1] in the denominator only at
    sigma = 1, so 0.9999999 would give std_t ~ 2200 instead."""
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).clone()
    if sigmas.shape != (steps + 1,):
        raise ValueError(f"the backend gave {tuple(sigmas.shape)} flow sigmas for {steps} steps; expected {steps + 1}")
    given = sigmas.tolist()
    if torch.isfinite(sigmas).all() and abs(float(sigmas[0]) - 1) <= 1e-6:
        sigmas[0] = 1.0
    if not torch.isfinite(sigmas).all() or float(sigmas[0]) != 1 or float(sigmas[-1]) != 0 \
            or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"flow sigmas must descend strictly from 1 to 0, got {given}")
    return sigmas


class FlowSDEPolicy(Policy):
    name = "flow_sde"

    def __init__(self, noise_level: float = 0.7, variant: str = "sde",
                 window: Optional[Sequence[int]] = None):
        check_flow_options(noise_level, variant)
        self.noise_level = float(noise_level)
        self.variant = variant
        self.window = None if window is None else (int(window[0]), int(window[1]))

    def check_backend(self, backend) -> None:
        kind = getattr(backend, "sampling_kind", "vp")
        if kind != "flow":
            raise ValueError(f"policy 'flow_sde' needs a flow-matching model; this model samples with {kind} "
                             "(eps / v-prediction): use policy 'ddpm' (or 'auto')")

    def schedule(self, backend, steps: int) -> Schedule:
        if steps < 2:
            raise ValueError(f"steps={steps}: a flow model needs at least 2 steps (the last step is deterministic "
                             "and has no log-prob)")
        sigmas = check_flow_sigmas(backend.flow_sigmas(steps), steps)
        first, stop = self.window if self.window is not None else (0, steps - 1)
        if not 0 <= first < stop <= steps - 1:
            raise ValueError(f"sde_window={[first, stop]}: need 0 <= first < stop <= steps - 1 = {steps - 1} "
                             "(the last step is deterministic)")
        return Schedule(sigmas[:-1], sigmas[1:], torch.arange(first, stop))

    def transition(self, prediction: torch.Tensor, kind: str, x: torch.Tensor, schedule: Schedule,
                   step: torch.Tensor, backend=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        index = step.cpu().long()
        trained = torch.isin(index, schedule.trained)
        if trained.any() and not trained.all():
            raise ValueError("a batch mixes stochastic and deterministic flow steps; evaluate them separately")
        sigma = per_row(schedule.times, index, x)
        sigma_next = per_row(schedule.next_times, index, x)
        velocity = self.velocity(prediction, kind, x, sigma)
        dt = sigma_next - sigma
        if not trained.any():                                  # ODE step (Euler)
            return x + on_model(dt, x) * velocity, None
        if self.variant == "cps":
            return self._cps(x, velocity, sigma, sigma_next)
        return self._sde(x, velocity, sigma, dt, float(schedule.times[1]))

    @staticmethod
    def velocity(prediction: torch.Tensor, kind: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if kind == "velocity":
            return prediction
        if kind == "x0":                                       # ComfyUI's denoised output
            return (x - prediction) / on_model(sigma, x)
        raise ValueError(f"the flow policy takes velocity or x0 predictions, not {kind!r} (a VP model?)")

    def _sde(self, x, velocity, sigma, dt, sigma_1: float):
        denominator = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_1), sigma)
        std_t = self.noise_level * (sigma / denominator).sqrt()
        drift = std_t ** 2 / (2 * sigma)
        mean = on_model(1 + drift * dt, x) * x + on_model(dt + drift * (1 - sigma) * dt, x) * velocity
        return mean, std_t * (-dt).sqrt()

    def _cps(self, x, velocity, sigma, sigma_next):
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        x0_hat = x - on_model(sigma, x) * velocity
        x1_hat = x + on_model(1 - sigma, x) * velocity
        mean = on_model(1 - sigma_next, x) * x0_hat + on_model((sigma_next ** 2 - std ** 2).clamp(min=0).sqrt(), x) * x1_hat
        return mean, std
