"""Trajectory recording and re-evaluation, for any policy (policies/): classifier-free
guidance, per-step log-probabilities while sampling, and the log-probs of recorded transitions
under other weights.

The policy owns the sampler's math (DDPM's DDIM-eta step, the flow SDE); this module only calls
the backend, combines CFG branches and records. Log-probs are float64 whatever dtype the model
computes in: the paper's clip range (1e-6) is only a few float32 ulps of a mean-reduced
log-prob. Sampling and re-evaluation share `policy_step_distribution`, so a recorded transition
re-evaluated with unchanged weights gives the recorded log-prob.

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
from .policies.base import Policy, Schedule
from .policies.ddpm import DDPMPolicy, alpha_pair, check_eta, ddim_timesteps, step_distribution  # noqa: F401

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


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
    """The rows of `a` then those of `b` (CFG's uncond and cond in one batch). Token axes of
    different lengths (a prompt over 75 CLIP tokens: 154 against 77) are repeated to their lcm
    when the conds carry each row's true length ("context_tokens": the backend evaluates each
    row at it, or on cross-attention where whole-block repetition is exact)."""
    if a.keys() != b.keys():
        raise ValueError(f"conditionings have different keys: {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if x.shape[1:] != y.shape[1:]:
            if "context_tokens" not in a or x.dim() < 2 or x.shape[2:] != y.shape[2:]:
                raise ValueError(f"conditionings' '{key}' have shapes {tuple(x.shape[1:])} and {tuple(y.shape[1:])} "
                                 "per row; encode both with one text encoder (a cond without true token counts "
                                 "'context_tokens' cannot be batched at different lengths)")
            length = math.lcm(x.shape[1], y.shape[1])
            x, y = (v.repeat(1, length // v.shape[1], *([1] * (v.dim() - 2))) for v in (x, y))
        out[key] = torch.cat([x, y])
    return out


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    return {key: value[index.to(value.device)] for key, value in cond.items()}


def guided_eps(backend: Backend, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
               cfg: float) -> torch.Tensor:
    """CFG-combined noise prediction of a VP backend in float32: eps_u + w * (eps_c - eps_u)."""
    return _guided(backend.predict_eps, x, t, cond, uncond, cfg)


def guided_prediction(backend: Backend, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                      cfg: float) -> torch.Tensor:
    """CFG-combined prediction in the backend's own terms (`backend.prediction`), float32.
    CFG is affine in the prediction, so combining eps, x0 or velocity gives the same step."""
    return _guided(backend.predict, x, t, cond, uncond, cfg)


def _guided(predict, x, t, cond, uncond, cfg):
    if cfg == 1.0:
        return predict(x, t, cond).float()
    both = predict(torch.cat([x, x]), torch.cat([t, t]), concat_cond(uncond, cond)).float()
    uncond_out, cond_out = both.chunk(2)
    return uncond_out + cfg * (cond_out - uncond_out)


def policy_step_distribution(backend: Backend, policy: Policy, schedule: Schedule, x_t: torch.Tensor,
                             step: torch.Tensor, cond: Cond, uncond: Cond, *, cfg: float):
    """(mean, std) of the policy's transition at x_t [n] from steps `step` [n] (indices into
    `schedule`) under the backend's current weights; std is None for a deterministic step."""
    step = step.cpu().long()
    times = schedule.times[step]
    prediction = guided_prediction(backend, x_t.to(backend.dtype), times.to(backend.device), cond, uncond, cfg)
    return policy.transition(prediction, backend.prediction, x_t.float(), schedule, step, backend)


def guided_step_distribution(backend: Backend, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                             cond: Cond, uncond: Cond, *, cfg: float, eta: float):
    """(mean, std) of the DDPM (DDIM-eta) transition from timesteps t to t_prev [n]."""
    schedule = Schedule(t.cpu(), t_prev.cpu(), torch.arange(len(t)))
    return policy_step_distribution(backend, DDPMPolicy(eta), schedule, x_t, torch.arange(len(t)), cond, uncond,
                                    cfg=cfg)


def transition_logprob(backend: Backend, x_t: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor,
                       t_prev: torch.Tensor, cond: Cond, uncond: Cond, *, cfg: float, eta: float,
                       reduce: str = "mean") -> torch.Tensor:
    """log p(x_prev | x_t, c) [n] of DDPM transitions (timesteps t -> t_prev) under the backend's
    current weights. Differentiable with respect to the model's trainable parameters."""
    mean, std = guided_step_distribution(backend, x_t, t, t_prev, cond, uncond, cfg=cfg, eta=eta)
    return gaussian_logprob(x_prev.to(mean.device), mean, std, reduce)


@dataclass
class Trajectories:
    """Recorded sampling trajectories (latents on the CPU).

    latents [n, S+1, C, h, w]: latents[:, 0] is the initial noise, latents[:, -1] the sample
    (S = every step of the schedule, deterministic ones included).
    logp [n, T]: float64 log-prob of each trained (stochastic) transition under the sampling
    weights; column k is schedule step `steps[k]` (DDPM: every step, steps = 0..T-1).
    timesteps, prev_timesteps [T]: the schedule values of those steps (DDPM: integer timesteps;
    flow: sigma and sigma').
    logp_ref, kl [n, T] (float64, only when sampled `with_reference`): the transition's log-prob
    under the base model, and the exact KL(sampling step || base step) at each visited x_t.
    policy, schedule: what re-evaluation (`recorded_logprob`) needs (None: DDPM from the fields).
    """

    latents: torch.Tensor
    logp: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    logp_ref: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    steps: Optional[torch.Tensor] = None
    policy: Optional[Policy] = None
    schedule: Optional[Schedule] = None

    def __post_init__(self):
        if self.steps is None:
            self.steps = torch.arange(self.logp.shape[1])

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    def transitions(self, rows: torch.Tensor, columns: torch.Tensor):
        """(x_t, x_next, schedule step) of the recorded transitions (rows[k], columns[k])."""
        step = self.steps[columns.cpu().long()]
        rows = rows.cpu().long()
        return self.latents[rows, step], self.latents[rows, step + 1], step


def join_trajectories(chunks: Sequence[Trajectories]) -> Trajectories:
    """Rows of several sampling calls of one schedule, concatenated."""
    joined = (lambda name: None if getattr(chunks[0], name) is None else torch.cat([getattr(c, name) for c in chunks]))
    first = chunks[0]
    return Trajectories(joined("latents"), joined("logp"), first.timesteps, first.prev_timesteps,
                        logp_ref=joined("logp_ref"), kl=joined("kl"), steps=first.steps, policy=first.policy,
                        schedule=first.schedule)


def recorded_logprob(backend: Backend, traj: Trajectories, rows: torch.Tensor, columns: torch.Tensor,
                     cond: Cond, uncond: Cond, *, cfg: float, reduce: str = "mean",
                     eta: Optional[float] = None) -> torch.Tensor:
    """log-probs [k] of recorded transitions (rows[k], log-prob column columns[k]) of `traj`
    under the backend's current weights; cond/uncond have one row per transition.
    Differentiable with respect to the model's trainable parameters. Trajectories without a
    recorded policy are DDPM ones (`eta` needed)."""
    x_t, x_next, step = traj.transitions(rows, columns)
    if traj.policy is None:
        if eta is None:
            raise ValueError("these trajectories carry no policy: give eta (DDPM)")
        return transition_logprob(backend, x_t.to(backend.device), x_next.to(backend.device), traj.timesteps[columns],
                                  traj.prev_timesteps[columns], cond, uncond, cfg=cfg, eta=eta, reduce=reduce)
    mean, std = policy_step_distribution(backend, traj.policy, traj.schedule, x_t.to(backend.device), step, cond,
                                         uncond, cfg=cfg)
    if std is None:
        raise ValueError("a deterministic step has no log-prob; re-evaluate only the trained steps")
    return gaussian_logprob(x_next.to(mean.device), mean, std, reduce)


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
                        latent_shape: Sequence[int], generator, eta: Optional[float] = None,
                        policy: Optional[Policy] = None, reduce: str = "mean", on_step=None,
                        with_reference: bool = False) -> Trajectories:
    """Sample one trajectory per row of `cond` (uncond has the same batch size) with `policy`
    (or, given only `eta`, the DDPM policy with that eta).

    Noise comes from `generator` on the CPU (see `cpu_noise`: one generator, or one per row),
    so a seed gives the same images on any device; deterministic steps draw none. With
    `with_reference`, the base model (adapters disabled) is evaluated at each visited x_t of a
    trained step too, filling `logp_ref` and `kl`. `on_step(i, S)` is called after each step.
    """
    if policy is None:
        if eta is None:
            raise ValueError("sample_trajectories needs a policy (or eta for DDPM)")
        policy = DDPMPolicy(eta)
    policy.check_backend(backend)
    schedule = policy.schedule(backend, steps)
    n = next(iter(cond.values())).shape[0]
    x = cpu_noise(n, latent_shape, generator)
    latents = [x]
    logps: List[torch.Tensor] = []
    logps_ref: List[torch.Tensor] = []
    kls: List[torch.Tensor] = []
    device = backend.device
    x = x.to(device)
    total = schedule.steps
    for i in range(total):
        step = torch.full((n,), i, dtype=torch.long)
        mean, std = policy_step_distribution(backend, policy, schedule, x, step, cond, uncond, cfg=cfg)
        if std is None:
            x_next = mean
        else:
            noise = cpu_noise(n, latent_shape, generator).to(device)
            x_next = mean + std.float().to(device) * noise
            logps.append(gaussian_logprob(x_next, mean, std, reduce))      # stays on the device
            if with_reference:
                with backend.adapters_disabled():
                    mean_ref, _ = policy_step_distribution(backend, policy, schedule, x, step, cond, uncond, cfg=cfg)
                logps_ref.append(gaussian_logprob(x_next, mean_ref, std, reduce))
                kls.append(gaussian_kl_same_std(mean, mean_ref, std, reduce))
        latents.append(x_next.cpu())         # the step's one device-to-host copy
        x = x_next
        if on_step is not None:
            on_step(i + 1, total)
    logps, logps_ref, kls = columns_on_host(logps, logps_ref, kls)
    stacked = (lambda values: torch.stack(values, dim=1) if values else None)
    trained = schedule.trained
    logp = stacked(logps) if logps else torch.empty(n, 0, dtype=torch.float64)
    return Trajectories(torch.stack(latents, dim=1), logp, schedule.times[trained], schedule.next_times[trained],
                        logp_ref=stacked(logps_ref), kl=stacked(kls), steps=trained.clone(), policy=policy,
                        schedule=schedule)


def columns_on_host(*lists: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """The per-step float64 values of `lists` (each a list of [n] tensors on one device) on the
    CPU, moved in one device-to-host copy: sampling keeps them on the device (n x 8 bytes a
    step) instead of making each step wait for the device three more times."""
    flat = [value for values in lists for value in values]
    if not flat:
        return [list(values) for values in lists]
    moved = iter(torch.stack(flat).cpu().unbind(0))
    return [[next(moved) for _ in values] for values in lists]


def repeat_cond(cond: Cond, repeats: int) -> Cond:
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in cond.items()}


def broadcast_row(row: Cond, n: int) -> Cond:
    """The first row of `row` repeated to n rows; used for the negative prompt."""
    return {key: value[:1].expand(n, *value.shape[1:]).contiguous() for key, value in row.items()}
