"""The policy interface: how a sampler turns a model's prediction into a stochastic transition.

A policy owns one sampler's math, like a diffusers scheduler: the schedule of a run of `steps`
steps (from the backend's model), the Gaussian transition p(x_next | x, step) from the model
output at (x, step), and the conversion from the backend's prediction (`Backend.prediction`:
"eps", "x0" or "velocity") into what its step needs. Steps without a log-probability
(deterministic ODE steps) are sampled but never trained; `Schedule.trained` lists the others.

Everything above a policy (sampling.py's recording and re-evaluation, the objective, the
trainer) sees only `Schedule` and (mean, std).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Schedule:
    """The steps of one sampling run, step i going from `times[i]` to `next_times[i]`.

    times [T]: what the backend's `predict` is called at (DDPM: integer training timesteps;
    flow: sigma in [0, 1]). next_times [T]: the step's end (DDPM: the previous timestep, -1 for
    the final step; flow: sigma'). trained [K] (long, ascending): the steps that are stochastic
    and have a log-probability; the others are deterministic.
    """

    times: torch.Tensor
    next_times: torch.Tensor
    trained: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.times)


class Policy:
    """One stochastic sampler. Subclasses implement `schedule`, `check_backend` and `transition`."""

    #: the config value that selects it (TrainConfig.policy)
    name: str = "abstract"

    def check_backend(self, backend) -> None:
        """Raise a one-line ValueError when the backend's model cannot be sampled by this policy."""
        raise NotImplementedError

    def schedule(self, backend, steps: int) -> Schedule:
        raise NotImplementedError

    def transition(self, prediction: torch.Tensor, kind: str, x: torch.Tensor, schedule: Schedule,
                   step: torch.Tensor, backend) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean float32, std float64 broadcastable or None) of p(x_next | x) for rows at steps
        `step` [n] (long indices into `schedule`), from the backend's (CFG-combined) prediction
        of kind `kind`. std is None for deterministic steps (mean is then x_next)."""
        raise NotImplementedError


def per_row(values: torch.Tensor, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[step] as float64 [n, 1, ...] broadcastable against `like` (on a float64-capable device)."""
    device = like.device if like.device.type != "mps" else torch.device("cpu")
    picked = values.to(torch.float64)[step.cpu().long()]
    return picked.to(device).view((-1,) + (1,) * (like.dim() - 1))


def on_model(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient as float32 on `like`'s device (for the float32 mean)."""
    return value.float().to(like.device)
