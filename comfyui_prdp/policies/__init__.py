"""Stochastic samplers with log-probabilities, one per file (see base.py)."""
from __future__ import annotations

from .base import Policy, Schedule
from .ddpm import DDPMPolicy
from .flow_sde import FlowSDEPolicy

POLICIES = ("auto", "ddpm", "flow_sde")


def policy_for(config, backend) -> Policy:
    """The policy a TrainConfig asks for; "auto": ddpm for VP models, flow_sde for flow models.
    Checked against the backend's model (one-line error on a mismatch)."""
    name = getattr(config, "policy", "auto")
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}: use one of {', '.join(POLICIES)}")
    if name == "auto":
        name = "flow_sde" if getattr(backend, "sampling_kind", "vp") == "flow" else "ddpm"
    if name == "ddpm":
        policy: Policy = DDPMPolicy(config.eta, getattr(config, "sde_window", None))
    else:
        policy = FlowSDEPolicy(getattr(config, "flow_noise_level", 0.7), getattr(config, "flow_sde_variant", "sde"),
                               getattr(config, "sde_window", None))
    policy.check_backend(backend)
    window = getattr(config, "sde_window", None)
    steps = getattr(config, "steps", None)
    if window is not None and steps is not None:      # 'auto' is resolved only here: check the window again
        last = steps - 1 if name == "flow_sde" else steps
        if not 0 <= window[0] < window[1] <= last:
            why = " (a flow model's last step is deterministic)" if name == "flow_sde" else ""
            raise ValueError(f"sde_window={list(window)}: this model samples with policy {name!r}, which needs "
                             f"0 <= first < stop <= {last} at steps={steps}{why}")
    return policy


__all__ = ["Policy", "Schedule", "DDPMPolicy", "FlowSDEPolicy", "POLICIES", "policy_for"]
