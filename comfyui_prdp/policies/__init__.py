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
    return policy


__all__ = ["Policy", "Schedule", "DDPMPolicy", "FlowSDEPolicy", "POLICIES", "policy_for"]
