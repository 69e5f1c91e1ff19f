"""How large a trajectory log-ratio the same model change makes under each policy (first order).

PRDP's beta and clip range live on the log-ratio's scale, which differs between policies, so
they do not transfer. For a change delta of the denoised prediction x0 (the same for every
model kind), step t's mean moves by |dmean/dx0| delta; the per-step log-ratio's first-order
term is (dmean . z) / std, so its scale is s_t = |dmean/dx0| / std, and the trajectory value
PRDP uses (mean over T steps) scales with k = sqrt(sum_t s_t^2) / T. Ratios of k between
policies are how far beta (divide) and the clip range (multiply) move for the same training
strength. A first-order estimate from the schedules alone, not a tuning on real models.

    python benchmarks/policy_logratio_scale.py
"""
from __future__ import annotations

import math

import torch

from comfyui_prdp.policies.ddpm import alpha_pair, ddim_timesteps


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def ddpm_sensitivity(steps: int, eta: float = 1.0) -> torch.Tensor:
    t, t_prev = ddim_timesteps(1000, steps)
    a_t, a_p = alpha_pair(sd_alphas_cumprod(), t, t_prev)
    std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    direction = (1 - a_p - std ** 2).clamp(min=0).sqrt()
    return (a_p.sqrt() - direction * a_t.sqrt() / (1 - a_t).sqrt()).abs() / std


def flow_sensitivity(sigmas: torch.Tensor, a: float = 0.7, variant: str = "sde") -> torch.Tensor:
    """Over the stochastic steps (all but the last); v = (x - x0) / sigma."""
    out = []
    for i in range(len(sigmas) - 2):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = sigma_next - sigma
        if variant == "sde":
            std_t = a * math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma >= 1 else sigma)))
            dmean = abs(dt + std_t ** 2 / (2 * sigma) * (1 - sigma) * dt) / sigma
            std = std_t * math.sqrt(-dt)
        else:
            std = sigma_next * math.sin(a * math.pi / 2)
            dmean = abs(-(1 - sigma_next) * sigma + math.sqrt(sigma_next ** 2 - std ** 2) * (1 - sigma)) / sigma
        out.append(dmean / std)
    return torch.tensor(out, dtype=torch.float64)


def sd3_sigmas(steps: int, shift: float) -> torch.Tensor:
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * t / (1 + (shift - 1) * t)


def flux_sigmas(steps: int, mu: float) -> torch.Tensor:
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return torch.where(t > 0, math.exp(mu) / (math.exp(mu) + 1 / t.clamp(min=1e-12) - 1), torch.zeros_like(t))


def trajectory_scale(s: torch.Tensor) -> float:
    return float((s ** 2).sum().sqrt() / len(s))


def main() -> None:
    reference = trajectory_scale(ddpm_sensitivity(20))
    print(f"DDPM eta=1, SD schedule, 20 steps: k = {reference:.4f} (the reference)")
    for name, sigmas in (("SD3/3.5 (shift 3.0), 20 steps", sd3_sigmas(20, 3.0)),
                         ("Flux (mu 1.15), 16 steps", flux_sigmas(16, 1.15))):
        for variant in ("sde", "cps"):
            k = trajectory_scale(flow_sensitivity(sigmas, 0.7, variant))
            print(f"flow_sde {variant} a=0.7, {name}: k = {k:.4f}, ratio to DDPM {k / reference:.3f} "
                  f"-> beta x {reference / k:.1f}, clip range x {k / reference:.3f}")


if __name__ == "__main__":
    main()
