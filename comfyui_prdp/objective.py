"""The PRDP objective (docs/algorithm.md section 2), the DDPO baseline (section 6), and the exact per-step
gradient weights that let the trainer back-propagate one micro-batch at a time.

Shapes: logp, logp_old, logp_ref are [..., B, T]; rewards [..., B]. Leading dims are prompt
groups: pairs are only formed within a group. Every loss returns the mean over groups.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch


def _as_groups(logp: torch.Tensor, rewards: torch.Tensor):
    if logp.dim() < 2:
        raise ValueError(f"logp must have shape [..., B, T], got {tuple(logp.shape)}")
    if rewards.shape != logp.shape[:-1]:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} must equal logp shape without T "
                         f"{tuple(logp.shape[:-1])}")
    return logp.reshape(-1, *logp.shape[-2:]), rewards.reshape(-1, rewards.shape[-1])


def _reduce_steps(values: torch.Tensor, step_reduce: str) -> torch.Tensor:
    return values.mean(-1) if step_reduce == "mean" else values.sum(-1)


def prdp_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
              rewards: torch.Tensor, *, beta: float, clip_range: float,
              step_reduce: str = "mean") -> torch.Tensor:
    """Reward-difference-prediction loss with the per-step proximal clip, mean over groups.

    For each group and each pair (i, j) with r_i > r_j:
        l = max((s_i - s_j - (r_i - r_j)/beta)^2, (sc_i - sc_j - (r_i - r_j)/beta)^2)
    where s = mean_t(logp - logp_ref) and sc the same with the log-ratio clipped per step to
    rho_old +- clip_range. A group's loss is the mean over its pairs (0 without pairs).
    """
    logp, rewards_g = _as_groups(logp, rewards)
    logp_old = logp_old.reshape(logp.shape)
    logp_ref = logp_ref.reshape(logp.shape)
    rho = logp - logp_ref
    rho_old = logp_old - logp_ref
    rho_clipped = torch.clamp(rho, rho_old - clip_range, rho_old + clip_range)
    s = _reduce_steps(rho, step_reduce)                       # [G, B]
    s_clipped = _reduce_steps(rho_clipped, step_reduce)
    reward_diff = rewards_g[:, :, None] - rewards_g[:, None, :]  # [G, B, B]: r_i - r_j
    target = reward_diff / beta
    pairs = reward_diff > 0
    unclipped = (s[:, :, None] - s[:, None, :] - target) ** 2
    clipped = (s_clipped[:, :, None] - s_clipped[:, None, :] - target) ** 2
    per_pair = torch.where(pairs, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    pair_count = pairs.sum(dim=(1, 2))
    per_group = per_pair.sum(dim=(1, 2)) / pair_count.clamp(min=1)
    return per_group.mean()


def pair_agreement(logp: torch.Tensor, logp_ref: torch.Tensor, rewards: torch.Tensor,
                   step_reduce: str = "mean") -> Tuple[float, int]:
    """(fraction, pairs): how often the model's predicted preference agrees with the reward's.

    PRDP's model predicts the reward difference of a pair as beta * (s_i - s_j), with
    s = mean_t(logp - logp_ref) (see prdp_loss); over the pairs with r_i > r_j of each group,
    count s_i > s_j as 1 and a tie as 1/2. 0.5 is chance (a LoRA equal to the base model gives
    exactly 0.5); 1.0 means every pair is ranked as the reward ranks it. (nan, 0) without pairs.
    """
    logp, rewards_g = _as_groups(logp, rewards)
    s = _reduce_steps(logp - logp_ref.reshape(logp.shape), step_reduce)       # [G, B]
    pairs = (rewards_g[:, :, None] - rewards_g[:, None, :]) > 0
    predicted = s[:, :, None] - s[:, None, :]
    score = torch.where(predicted > 0, 1.0, torch.where(predicted == 0, 0.5, 0.0)).to(torch.float64)
    count = int(pairs.sum())
    if count == 0:
        return float("nan"), 0
    return float(score[pairs].sum()) / count, count


def group_advantages(rewards: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """DDPO's per-prompt normalised reward, clipped to +-adv_clip. rewards: [G, B]."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return ((rewards - mean) / (std + 1e-8)).clamp(-adv_clip, adv_clip)


def ddpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
              rewards: torch.Tensor, *, clip_range: float = 1e-4, adv_clip: float = 5.0,
              advantages: Optional[torch.Tensor] = None, **_: object) -> torch.Tensor:
    """DDPO's clipped surrogate: mean over (i, t) of max(-A ratio, -A clip(ratio, 1-c, 1+c)).

    `advantages` (shape of rewards): normalised rewards computed elsewhere (DDPO's per-prompt
    tracker, see advantages.py); without them, each group is normalised by its own statistics.
    Either way they are clipped to +-adv_clip. logp_ref is accepted (and ignored) so both
    losses share one signature."""
    logp, rewards_g = _as_groups(logp, rewards)
    logp_old = logp_old.reshape(logp.shape)
    if advantages is None:
        advantages = group_advantages(rewards_g, adv_clip)
    else:
        if advantages.shape != rewards.shape:
            raise ValueError(f"advantages shape {tuple(advantages.shape)} must equal rewards shape "
                             f"{tuple(rewards.shape)}")
        advantages = advantages.reshape(rewards_g.shape).to(logp.dtype).clamp(-adv_clip, adv_clip)
    advantages = advantages[..., None]   # [G, B, 1]
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


LossFn = Callable[..., torch.Tensor]
LOSSES: Dict[str, LossFn] = {"prdp": prdp_loss, "ddpo": ddpo_loss}


def logp_gradient_weights(loss_fn: LossFn, logp: torch.Tensor, logp_old: torch.Tensor,
                          logp_ref: torch.Tensor, rewards: torch.Tensor,
                          **loss_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss value, w) with w = dLoss/dlogp, evaluated at the given log-prob values in float64.

    float64 matters: at the paper's beta = 3e-5, R/beta ~ 300 has a float32 spacing 30x the
    clip range eps = 1e-6, so in float32 the branches of the max and the clip mask are wrong.
    Because the loss depends on the model only through logp, the exact parameter gradient is
    sum_{i,t} w[i,t] * dlogp[i,t]/dtheta: the trainer back-propagates sum(w * logp) in
    micro-batches, so memory does not grow with the number of steps.
    """
    leaf = logp.detach().double().clone().requires_grad_(True)
    loss_kwargs = {key: value.detach().double() if isinstance(value, torch.Tensor) else value
                   for key, value in loss_kwargs.items()}
    with torch.enable_grad():
        loss = loss_fn(leaf, logp_old.detach().double(), logp_ref.detach().double(),
                       rewards.detach().double(), **loss_kwargs)
        (weights,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), weights


def clip_fraction(logp: torch.Tensor, logp_old: torch.Tensor, clip_range: float,
                  algorithm: str = "prdp") -> float:
    """Fraction of steps whose log-ratio (PRDP) or ratio (DDPO) lies outside the clip range."""
    if algorithm == "ddpo":
        outside = (torch.exp(logp - logp_old) - 1).abs() > clip_range
    else:
        outside = (logp - logp_old).abs() > clip_range   # rho - rho_old = logp - logp_old
    return outside.float().mean().item()


class DynamicLossScale:
    """Dynamic loss scaling for models that compute in float16 (torch.amp.GradScaler's rule).

    The trainer multiplies the per-step weights w by `scale` before each backward pass, so
    output gradients near 1e-4 / D (D latent elements) do not underflow float16's 6e-8, and
    divides the LoRA gradients by it before clipping (a power of two: both exact). A step whose
    unscaled gradient is not finite is skipped and the scale halved (`back_off`; False once the
    scale is down to `min_scale`: the gradient is not finite even unscaled); `growth_interval`
    steps taken in a row double it. Not torch.amp.GradScaler itself: its step reads found-inf
    in a sync of its own, where the trainer's gradient-norm read already decides the skip.
    """

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.good_steps = 0

    def unscale_(self, params: List[torch.Tensor]) -> None:
        """Divide the gradients of `params` by the scale, in place (their own float dtype)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def back_off(self) -> bool:
        """After a non-finite gradient: halve the scale (True), or False when it is at its minimum."""
        self.good_steps = 0
        if self.scale / 2 < self.min_scale:
            return False
        self.scale /= 2
        return True

    def step_taken(self) -> None:
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2
            self.good_steps = 0

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        scale, good = state.get("scale"), state.get("good_steps", 0)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= self.min_scale
                and isinstance(good, int) and good >= 0):
            raise ValueError(f"checkpoint loss scale {state!r} is not a scale >= {self.min_scale} with a step "
                             "count: resume from another checkpoint")
        self.scale, self.good_steps = float(scale), good
