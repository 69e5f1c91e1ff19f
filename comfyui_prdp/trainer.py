"""The online loop (Algorithm 1 of the paper, spec section 3).

Each epoch: draw N prompts; sample B trajectories each with the current weights (theta_old),
recording latents and log-probs, and the base model's log-probs (adapters disabled) at the
same visited latents; decode and score; then K updates over prompt minibatches. Each update computes the exact
gradient in two passes: per-step weights w = dLoss/dlogp without gradients, then micro-batched
backward passes of sum(w * logp), so memory is one micro-batch whatever T and B are.

Randomness is derived from (seed, epoch), so resuming from a checkpoint at an epoch boundary
gives the same result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .advantages import PerPromptStatTracker
from .backends.base import Backend
from .config import TrainConfig
from .distributed.faults import RankFailed, RankFaults
from .distributed.group import SINGLE, Distributed
from .heldout import HeldOutMonitor
from .lora.files import atomic_write, lora_metadata, save_lora, unique_path
from .objective import LOSSES, DynamicLossScale, clip_fraction, logp_gradient_weights, pair_agreement
from .policies import policy_for
from .prompts import PromptSet
from .rewards.base import reward_device_bytes
from .runs import checkpoints
from .runs.stop_signals import StopRequested
from .sampling import (Trajectories, broadcast_row, index_cond, join_trajectories, recorded_logprob, repeat_cond,
                       sample_trajectories)

Callback = Callable[[dict], None]
CHECKPOINT_STATE = checkpoints.STATE_FILE
CHECKPOINT_LORA = checkpoints.LORA_FILE


def computes_in_float16(backend: Backend) -> bool:
    """Whether the backend's model computes in float16 (its `compute_dtype` where it declares
    one, e.g. a host that takes float32 inputs and casts them, else `dtype`): its gradients then
    need loss scaling. bfloat16 and float32 have float32's range and are left alone."""
    return getattr(backend, "compute_dtype", backend.dtype) == torch.float16


def micro_batches(rows: torch.Tensor, steps: torch.Tensor, sample_batch_size: int,
                  train_batch_size: int) -> List[torch.Tensor]:
    """Positions k of the transitions (rows[k], steps[k]) grouped into model calls of at most
    train_batch_size rows, laid out as sampling evaluated them where that fits.

    Why: kernels round differently at other batch sizes (GPUs ~1e-6-1e-5 per log-prob; this
    CPU 8.4e-7 on the embedded UNet with 2-row sampling batches re-evaluated 4 or 8 at a time),
    which at a clip range of 1e-6 decides the clip mask. With train_batch_size >=
    sample_batch_size each call is the rows of one sampling batch (row // sample_batch_size,
    rows numbered as sampled) at one step, in row order: the model inputs each transition was
    recorded with, so unchanged weights give the recorded log-prob (exactly on this CPU, where
    the old packing was off by 8.4e-7). Exact when every sampling batch is whole in the
    minibatch (always when sample_batch_size divides images_per_prompt, or minibatch_prompts
    is unset). Trade-off: train_batch_size stays the memory bound, so with a larger
    sample_batch_size no call can match sampling's, and transitions are packed row-major,
    train_batch_size at a time, as before; with a smaller one the calls hold
    sample_batch_size rows, more and smaller calls than packing would make.
    """
    if len(rows) == 0:
        return []
    if train_batch_size < sample_batch_size:
        return list(torch.arange(len(rows)).split(train_batch_size))
    rows, steps = rows.cpu().long(), steps.cpu().long()
    group = (rows // sample_batch_size) * (int(steps.max()) + 1) + steps      # (sampling batch, step)
    order = torch.argsort(group * (int(rows.max()) + 1) + rows)                # unique keys
    _, sizes = torch.unique_consecutive(group[order], return_counts=True)
    return list(order.split(sizes.tolist()))


@dataclass
class TrainResult:
    epochs_done: int
    stopped: bool
    metrics: List[dict] = field(default_factory=list)
    lora_path: Optional[Path] = None
    checkpoint_path: Optional[Path] = None
    early_stopped: bool = False        # the held-out early stop ended the run (heldout.py)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63))


def trajectory_generators(seed: int, epoch: int, rows: range) -> List[torch.Generator]:
    """One CPU generator per trajectory, depending only on (seed, epoch, trajectory index): a
    trajectory's noise is the same whichever rank samples it and in whichever batch."""
    def seeded(index: int) -> torch.Generator:
        digest = hashlib.blake2b(f"prdp-trajectory:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2 ** 63))
    return [seeded(index) for index in rows]


@dataclass
class EpochBatch:
    """Everything sampled in one epoch, grouped by prompt: rows are prompt-major (N*B)."""
    prompts: List[str]          # N prompts of this epoch
    cond: Dict[str, torch.Tensor]  # conditioning per trajectory [N*B, ...]
    uncond: Dict[str, torch.Tensor]
    traj: Trajectories
    logp_ref: torch.Tensor      # [N*B, T] float64
    rewards: torch.Tensor       # [N*B]
    images: torch.Tensor        # [N*B, H, W, 3]
    advantages: Optional[torch.Tensor] = None   # [N*B], DDPO with the per-prompt tracker
    # distributed runs: this rank holds prompt groups first_group ... first_group + len(prompts)
    # of the epoch's epoch_prompts (all ranks' N); the fields above are this rank's rows only
    first_group: int = 0
    epoch_prompts: Optional[List[str]] = None

    @property
    def all_prompts(self) -> List[str]:
        return self.prompts if self.epoch_prompts is None else self.epoch_prompts

    @property
    def row_prompts(self) -> List[str]:
        per_prompt = len(self.traj.logp) // max(1, len(self.prompts))
        return [p for p in self.prompts for _ in range(per_prompt)]


class Trainer:
    def __init__(self, backend: Backend, reward, prompts: List[str], config: TrainConfig,
                 out_dir: Optional[Path] = None, callback: Optional[Callback] = None,
                 stop_event: Optional[threading.Event] = None,
                 lora_path: Optional[Path] = None, distributed: Optional[Distributed] = None,
                 estimate_cost: bool = True):
        """estimate_cost: time one model evaluation before the first epoch and announce the
        epoch's cost (off where every evaluation must be training compute: benchmarks/stability.py)."""
        self.config = config.validate()
        self.dist = distributed or SINGLE
        self.dist.check_shardable(self.config.prompts_per_epoch)
        if not isinstance(prompts, PromptSet):     # a PromptSet is checked and stays lazy
            prompts = [p.strip() for p in prompts if p and p.strip()]
        if not prompts:
            raise ValueError("no prompts: give at least one non-empty prompt (one per line)")
        self.backend = backend
        self.reward = reward
        self.prompts = prompts
        # rank 0 alone writes files: the other ranks of a distributed run have no output folder
        self.out_dir = Path(out_dir) if out_dir is not None and self.dist.is_main else None
        self.lora_path = Path(lora_path) if lora_path is not None and self.dist.is_main else (
            self.out_dir / "lora.safetensors" if self.out_dir is not None else None)
        self.callback = callback or (lambda event: None)
        self.stop_event = stop_event or threading.Event()
        self._faults = RankFaults(self.dist, passthrough=(StopRequested,))   # an error on one rank ends all
        self.loss_fn = LOSSES[config.algorithm]
        params = backend.trainable_parameters()
        if not params:
            raise ValueError("the backend has no trainable LoRA parameters")
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas,
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        #: float16 models: the loss scale of their backward passes (None otherwise)
        self.loss_scale = DynamicLossScale() if computes_in_float16(backend) else None
        self.latent_shape = tuple(backend.latent_shape(config.height, config.width))
        self.metrics: List[dict] = []
        self.epoch = 0
        #: set to a heldout.HeldOutMonitor (before run) to score held-out pairs every eval_every epochs
        self.held_out: Optional[HeldOutMonitor] = None
        self._progress_units = 0
        self._estimated = not estimate_cost     # the epoch's cost is announced once per run (estimate event)
        self._trained_steps: Optional[set] = None
        self._uncond_one = None
        self.ddpo_tracker = PerPromptStatTracker(config.ddpo_buffer_size, config.ddpo_min_count)
        if self.dist.enabled:     # every rank starts from rank 0's LoRA, with the same settings
            self.dist.check_same("settings or prompts", json.dumps(
                [self.config.to_dict(), len(prompts), prompts[0], prompts[len(prompts) - 1]]))
            self.dist.broadcast_parameters(params)

    def extra_state(self) -> dict:
        """JSON-serialisable trainer state beyond weights and optimizer (saved in checkpoints)."""
        state = {"ddpo_tracker": self.ddpo_tracker.state_dict()}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        if self.held_out is not None:
            state["held_out"] = self.held_out.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        if "ddpo_tracker" in state:
            self.ddpo_tracker.load_state_dict(state["ddpo_tracker"])
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.load_state_dict(state["loss_scale"])
        if self.held_out is not None and "held_out" in state:
            self.held_out.load_state_dict(state["held_out"])
        if self.held_out is not None:       # best/ may be ahead of this checkpoint (heldout.py)
            self.held_out.adopt_saved_best(self.out_dir)

    def _resume(self, path: Path) -> None:
        """Load the checkpoint. Distributed, a load error on any rank ends every rank with
        RankFailed (no checkpoint: nothing was trained), rank 0's held-out state (it alone sees
        best/) becomes every rank's, and rank 0 rewrites metrics.jsonl only once all have loaded."""
        if not self.dist.enabled:
            self.load_checkpoint(path)
            return
        self._faults.phase = "resume"
        self._faults.attempt(self.load_checkpoint, path, rewrite_metrics=False)
        self._faults.check(self.dist.any(self._faults.failed))
        if self.held_out is not None:
            self.held_out.load_state_dict(self.dist.broadcast_json(self.held_out.state_dict()))
        if self.out_dir is not None:
            self._faults.attempt(self._rewrite_metrics)
        self._faults.check(self.dist.any(self._faults.failed))

    # ------------------------------------------------------------------ public entry
    def run(self, resume_from: Optional[Path] = None) -> TrainResult:
        if resume_from is not None:
            self._resume(resume_from)
        stopped = False
        checkpoint_path = None
        try:
            with self._stops_inside_model_calls():
                while self.epoch < self.config.epochs and not (self.held_out and self.held_out.stopped_early):
                    self._sync_stop()
                    self._faults.phase = f"epoch {self.epoch + 1} start"
                    self._faults.attempt(self._mark_epoch_start)
                    metrics = self.train_epoch(self.epoch)
                    self.epoch += 1
                    self.metrics.append(metrics)
                    try:
                        early_stop = self._held_out_evaluation(metrics)   # eval/... into metrics, best/
                    except StopRequested:       # the epoch trained: its line stays (without eval/...)
                        self._faults.attempt(self._append_metrics, metrics)
                        raise
                    self._faults.phase = f"epoch {self.epoch} metrics and checkpoint"
                    self._faults.attempt(self._append_metrics, metrics)
                    if early_stop:
                        break
                    every = self.config.checkpoint_every
                    if every and self.epoch % every == 0 and self.epoch < self.config.epochs:
                        checkpoint_path = self._faults.attempt(self.save_checkpoint)
                if self.dist.enabled:       # an error after the last epoch's last collective
                    self._faults.check(self.dist.any(self._faults.failed))
        except StopRequested:
            stopped = True
        except RankFailed as failure:     # every rank alike; rank 0 keeps the last finished epoch
            self._checkpoint_after_failure(failure)
            raise
        early_stopped = self.held_out is not None and self.held_out.stopped_early
        if stopped or early_stopped or self.config.checkpoint_every:
            checkpoint_path = self.save_checkpoint(partial=stopped)
        lora_path = self.save_final_lora() if self.epoch > 0 else None    # no epoch finished: nothing to keep
        self.callback({"type": "done", "stopped": stopped, "epochs": self.epoch, "early_stopped": early_stopped})
        return TrainResult(self.epoch, stopped, list(self.metrics), lora_path, checkpoint_path, early_stopped)

    def _held_out_evaluation(self, metrics: dict) -> bool:
        """Score the held-out pairs when due (heldout.py): `eval/...` into this epoch's `metrics`,
        a new best into best/. True when the early stop ends the run (every rank alike)."""
        monitor = self.held_out
        if monitor is None or not monitor.due(self.epoch, self.config.epochs):
            return False
        self._event_phase(self.epoch - 1, "held-out evaluation")
        self._faults.attempt(self._score_held_out, monitor, metrics)
        # rank 0's stop decision on every rank (its monitor alone adopts best/ on resume)
        stopped, failed = self.dist.flags(monitor.stopped_early and self.dist.is_main, self._faults.failed)
        self._faults.check(failed)
        monitor.stopped_early = stopped
        return stopped

    def _score_held_out(self, monitor: HeldOutMonitor, metrics: dict) -> None:
        start = time.perf_counter()
        mean, std, _ = monitor.evaluate(self)
        previous = monitor.evaluations[-1]["epoch"] if monitor.evaluations else 0
        since = [m["reward_mean"] for m in self.metrics if m["epoch"] > previous]   # since the last one
        found, best = monitor.record(self, mean, sum(since) / len(since))    # best/ written before it counts
        metrics.update(found)
        metrics["eval/reward_std"] = std
        metrics["seconds_eval"] = round(time.perf_counter() - start, 4)
        if best is not None:
            self.callback({"type": "best", "epoch": self.epoch, "path": str(best)})
        self.callback({"type": "eval", "epoch": self.epoch,
                       "metrics": {k: v for k, v in metrics.items() if k.startswith("eval/")}})

    def _checkpoint_after_failure(self, failure: RankFailed) -> None:
        """Rank 0 writes the stop checkpoint: the state at the start of the failed epoch (or
        after the last finished one), never a partly updated LoRA."""
        try:
            failure.checkpoint = self.save_checkpoint(partial=True)
        except Exception as error:      # noqa: BLE001 - the run's own error is the one to raise
            failure.checkpoint_error = f"{type(error).__name__}: {error}"

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> dict:
        timings: Dict[str, float] = {}
        self._progress_units = 0

        start = time.perf_counter()
        self._event_phase(epoch, "sampling")
        batch = self.sample_epoch(epoch)        # with the base model's log-probs and the KL
        timings["sampling"] = time.perf_counter() - start

        start = time.perf_counter()
        self._event_phase(epoch, "reward")
        scored = self._faults.attempt(self.score, batch)
        self._sync_stop()              # before the gather: a stop, or an error on any rank so far, ends every rank
        rewards, components = scored
        batch.rewards = rewards
        epoch_rewards = self._gather_rows(batch, rewards)    # every rank's, in the single-process order
        if self.config.algorithm == "ddpo" and self.config.ddpo_advantages == "tracker":
            B = self.config.images_per_prompt
            epoch_row_prompts = [p for p in batch.all_prompts for _ in range(B)]
            advantages = self.ddpo_tracker.update(epoch_row_prompts, epoch_rewards)
            batch.advantages = advantages[batch.first_group * B:(batch.first_group + len(batch.prompts)) * B]
        timings["reward"] = time.perf_counter() - start

        start = time.perf_counter()
        self._event_phase(epoch, "update")
        update_stats = self.update(batch, epoch)
        timings["update"] = time.perf_counter() - start
        self._faults.phase = f"epoch {epoch + 1} metrics"

        metrics = {
            "epoch": epoch + 1,
            "reward_mean": epoch_rewards.mean().item(),
            "reward_std": epoch_rewards.std(unbiased=False).item(),
            "loss": update_stats["loss"],
            "clip_frac": update_stats["clip_frac"],

            # exact KL(p_theta_old || p_ref) of the whole trajectory (sum over steps of the
            # per-step Gaussian KL), mean over trajectories; log_ratio_mean is its one-sample
            # estimate sum_t (logp_old - logp_ref), signed
            "kl": self._gather_rows(batch, batch.traj.kl.sum(-1)).mean().item(),
            "log_ratio_mean": self._gather_rows(batch, (batch.traj.logp - batch.logp_ref).sum(-1)).mean().item(),
            "onpolicy_max_diff": update_stats["onpolicy_max_diff"],
            "grad_norm": update_stats["grad_norm"],
            "optimizer_steps": update_stats["optimizer_steps"],
        }
        if math.isfinite(update_stats["pair_agreement"]):    # PRDP only (DDPO has no pairs)
            metrics["pair_agreement"] = update_stats["pair_agreement"]
        for name in ("skipped_steps", "loss_scale"):       # float16 models only
            if name in update_stats:
                metrics[name] = update_stats[name]
        for name, values in components.items():
            if len(components) > 1 or name != getattr(self.reward, "name", name):
                metrics[f"reward/{name}"] = self._gather_rows(batch, values.float()).mean().item()
        for phase, seconds in timings.items():
            metrics[f"seconds_{phase}"] = round(seconds, 4)
        shown = min(4, len(batch.images))
        self._faults.attempt(self.callback, {
            "type": "epoch", "epoch": epoch + 1, "metrics": metrics, "preview": batch.images[:shown],
            "preview_rewards": rewards[:shown].tolist(), "preview_prompts": batch.row_prompts[:shown]})
        return metrics

    def sample_epoch(self, epoch: int) -> EpochBatch:
        cfg = self.config
        B = cfg.images_per_prompt
        groups = self.dist.shard(cfg.prompts_per_epoch)     # this rank's prompt groups (all of them alone)
        total, most_rows = len(groups) * B, max(self.dist.shard_sizes(cfg.prompts_per_epoch)) * B
        inputs = self._faults.attempt(self._sampling_inputs, epoch, groups)
        if not self._estimated:
            self._estimated = True
            self._faults.attempt(self._announce_epoch_estimate, epoch, inputs)
        chunks = []
        for start in range(0, most_rows, cfg.sample_batch_size):
            self._sync_stop()       # every rank passes here as often as the one with the most rows
            if start < total:
                chunks.append(self._faults.attempt(self._sample_rows, epoch, inputs, start))
        return self._faults.attempt(self._epoch_batch, inputs, chunks, groups.start)

    def _sampling_inputs(self, epoch: int, groups: range) -> tuple:
        """(the epoch's prompts, this rank's prompts, cond, uncond, one generator per trajectory)."""
        cfg = self.config
        generator = epoch_generator(cfg.seed, epoch)
        if cfg.prompts_per_epoch <= len(self.prompts):
            order = torch.randperm(len(self.prompts), generator=generator)[: cfg.prompts_per_epoch]
        else:
            order = torch.randint(len(self.prompts), (cfg.prompts_per_epoch,), generator=generator)
        epoch_prompts = [self.prompts[i] for i in order.tolist()]
        prompts = epoch_prompts[groups.start:groups.stop]
        B = cfg.images_per_prompt
        noise = trajectory_generators(cfg.seed, epoch, range(groups.start * B, groups.stop * B))
        self.backend.prepare_for_sampling()
        cond = repeat_cond(self.backend.encode_prompts(prompts), B)
        uncond = broadcast_row(self._negative_cond(), len(prompts) * B)
        return epoch_prompts, prompts, cond, uncond, noise

    def _sample_rows(self, epoch: int, inputs: tuple, start: int) -> Trajectories:
        """Trajectories of this rank's rows start ... start + sample_batch_size."""
        cfg = self.config
        _, prompts, cond, uncond, noise = inputs
        rows = torch.arange(start, min(len(prompts) * cfg.images_per_prompt, start + cfg.sample_batch_size))
        return sample_trajectories(
            self.backend, index_cond(cond, rows), index_cond(uncond, rows), steps=cfg.steps,
            cfg=cfg.cfg, policy=policy_for(cfg, self.backend), latent_shape=self.latent_shape,
            generator=noise[rows[0]:rows[-1] + 1],
            reduce=cfg.logprob_reduce, with_reference=True,
            on_step=lambda i, n: self._step(epoch, "sampling", len(rows) * self._cfg_branches() * (
                2 if i - 1 in self._trained_step_indices() else 1)))     # 2: and the base model's, at a trained step

    @staticmethod
    def _epoch_batch(inputs: tuple, chunks: List[Trajectories], first_group: int) -> EpochBatch:
        epoch_prompts, prompts, cond, uncond, _ = inputs
        traj = join_trajectories(chunks)
        return EpochBatch(prompts, cond, uncond, traj, logp_ref=traj.logp_ref,
                          rewards=torch.empty(0), images=torch.empty(0), first_group=first_group,
                          epoch_prompts=epoch_prompts)

    def score(self, batch: EpochBatch):
        cfg = self.config
        images = []
        with torch.no_grad():
            for start in range(0, len(batch.traj.final), cfg.sample_batch_size):
                self._check_stop()      # decoding a big batch at a big size takes a while too
                latents = batch.traj.final[start:start + cfg.sample_batch_size].to(self.backend.device)
                images.append(self.backend.decode(latents).float().cpu())
        batch.images = torch.cat(images)
        if not torch.isfinite(batch.images).all():
            raise RuntimeError("the decoded images contain NaN/inf: the model diverged or computes in a "
                               "precision that overflows (try mixed_precision 'no' or 'bf16', or a lower "
                               "learning rate); nothing was trained on them")
        row_prompts = batch.row_prompts
        self.backend.prepare_for_scoring(reward_device_bytes(self.reward))
        self.reward.prepare()
        try:
            with torch.no_grad():
                rewards, components = self.reward.score_with_components(batch.images, row_prompts)
        finally:
            self.reward.offload()
        name = getattr(self.reward, "name", type(self.reward).__name__)
        if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (len(row_prompts),):
            got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise RuntimeError(f"reward {name!r} returned {got}; expected a tensor of shape "
                               f"({len(row_prompts)},), one score per image")
        rewards = rewards.detach().float().cpu()
        if not torch.isfinite(rewards).all():
            raise RuntimeError(f"reward {name!r} returned non-finite values: {rewards.tolist()}")
        return rewards, {k: v.detach().float().cpu() for k, v in components.items()}

    @torch.no_grad()
    def reference_logprobs(self, batch: EpochBatch, epoch: int) -> torch.Tensor:
        """log-probs of every recorded transition under the base model (LoRA disabled), as a
        separate pass in training micro-batches. Training takes them from sampling instead
        (`sample_epoch`); this re-evaluation checks that they agree."""
        rows, steps = self._all_transitions(*batch.traj.logp.shape)
        with self.backend.adapters_disabled():
            values = self._logprobs(batch, rows, steps, grad_weights=None, epoch=epoch, phase="reference")
        return values.view_as(batch.traj.logp)

    # ------------------------------------------------------------------ updates
    def update(self, batch: EpochBatch, epoch: int) -> dict:
        """K updates; each optimizer step uses one minibatch of prompt groups. Distributed,
        the minibatch is the same on every rank, each computes the gradient of its own groups'
        share of the loss, and one all-reduce per step sums them (see _sum_over_ranks)."""
        cfg = self.config
        N = len(batch.all_prompts)
        mine = range(batch.first_group, batch.first_group + len(batch.prompts))
        minibatch = cfg.minibatch_prompts or N
        generator = epoch_generator(cfg.seed, epoch, stream=1)
        on_policy = True            # theta == theta_old until the first optimizer step
        losses, clip_fracs, grad_norms, skipped = [], [], [], 0
        agreed, pairs = 0.0, 0.0          # pair_agreement over the epoch's updates (PRDP only)
        onpolicy_diff = float("nan")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._faults.attempt(self.backend.prepare_for_training)
        for _ in range(cfg.updates_per_epoch):
            prompt_order = torch.randperm(N, generator=generator)
            for start in range(0, N, minibatch):
                train_steps = self._train_steps(generator, batch.traj.logp.shape[1])
                self.optimizer.zero_grad(set_to_none=True)
                groups = prompt_order[start:start + minibatch]
                local = groups[(groups >= mine.start) & (groups < mine.stop)] - mine.start
                share = len(local) / len(groups)     # the loss is a mean over the minibatch's groups
                stats = {"loss": 0.0, "clip_frac": 0.0, "onpolicy_max_diff": float("nan"), "agreed": 0.0, "pairs": 0}
                if len(local):      # (a rank that failed keeps the zero stats: this step's all-reduce ends the run)
                    stats = self._faults.attempt(self.minibatch_gradient, batch, local, train_steps, on_policy,
                                                 epoch, share) or stats
                if on_policy:
                    onpolicy_diff = stats["onpolicy_max_diff"]
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                loss, clip_frac, step_agreed, step_pairs = self._sum_over_ranks(
                    params, stats["loss"] * share, stats["clip_frac"] * share, stats["agreed"], stats["pairs"])
                agreed, pairs = agreed + step_agreed, pairs + step_pairs
                losses.append(loss)
                clip_fracs.append(clip_frac)
                grad_norm = self._faults.attempt(self._optimizer_step, params, epoch)
                if grad_norm is None and not self._faults.failed:     # a float16 step skipped: the
                    skipped += 1                                       # weights are unchanged, still on-policy
                else:
                    grad_norms.append(grad_norm)
                    on_policy = False
        onpolicy_diff, failed = self.dist.maxima(onpolicy_diff, float(self._faults.failed))
        self._faults.check(failed > 0)
        stats = {"loss": sum(losses) / len(losses), "clip_frac": sum(clip_fracs) / len(clip_fracs),
                 "onpolicy_max_diff": onpolicy_diff, "pair_agreement": agreed / pairs if pairs else float("nan"),
                 "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                 "optimizer_steps": len(losses) - skipped}
        if self.loss_scale is not None:
            stats.update(skipped_steps=skipped, loss_scale=self.loss_scale.scale)
        return stats

    def _optimizer_step(self, params: List[torch.Tensor], epoch: int) -> Optional[float]:
        """Clip the (summed) gradient and step; returns the gradient norm before clipping, or
        None for a float16 step skipped because its scaled gradient overflowed (loss_scale).
        Two device-to-host syncs whatever the number of LoRA tensors: the norm before the step
        (a non-finite gradient must not reach the weights), their finiteness after it."""
        checkpoints.align_optimizer_state(self.optimizer)     # the LoRA may have moved since a resume
        if self.loss_scale is not None:
            self.loss_scale.unscale_(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()
        if not math.isfinite(grad_norm):
            if self.loss_scale is not None and self.loss_scale.back_off():
                return None
            raise FloatingPointError(
                f"epoch {epoch + 1}: the LoRA gradient is not finite (norm {grad_norm}); the step was "
                "dropped and nothing was written. Lower the learning rate, raise beta, or train "
                "in float32 (mixed_precision 'no'); resume from the last checkpoint")
        self.optimizer.step()
        if not all_finite(params):
            raise FloatingPointError(
                f"epoch {epoch + 1}: an optimizer step made the LoRA weights non-finite; nothing was "
                "written. Lower the learning rate; resume from the last checkpoint")
        if self.loss_scale is not None:
            self.loss_scale.step_taken()
        return grad_norm

    def minibatch_gradient(self, batch: EpochBatch, groups: torch.Tensor, train_steps: torch.Tensor,
                           on_policy: bool, epoch: int, share: float = 1.0) -> dict:
        """Accumulate the exact gradient of `share` times the loss of prompt groups `groups`
        into .grad (share < 1: this rank's part of a minibatch's mean over groups).

        Pass 1 (no grad) gets the current log-probs (skipped when on_policy: they equal the
        recorded ones); the loss's derivative w.r.t. each log-prob gives per-step weights;
        pass 2 back-propagates sum(w * logp) one micro-batch at a time. With fewer train_steps
        than T the gradient is approximate (other steps keep their recorded values).
        """
        cfg = self.config
        B, T = cfg.images_per_prompt, batch.traj.logp.shape[1]    # T: the policy's trained steps
        G = len(groups)
        rows = (groups[:, None] * B + torch.arange(B)[None, :]).reshape(-1)   # [G*B], prompt-major
        logp_old = batch.traj.logp[rows]
        logp_ref = batch.logp_ref[rows]
        rewards = batch.rewards[rows].view(G, B)
        r_idx, t_idx = self._transitions(rows, train_steps)
        logp_now = logp_old.clone()
        if not on_policy:
            values = self._logprobs(batch, r_idx, t_idx, None, epoch, "update")
            logp_now[:, train_steps] = values.view(len(rows), len(train_steps))
        if cfg.algorithm == "ddpo":
            loss_kwargs = dict(clip_range=cfg.clip_range, adv_clip=cfg.adv_clip)
            if batch.advantages is not None:
                loss_kwargs["advantages"] = batch.advantages[rows].view(G, B)
        else:
            loss_kwargs = dict(beta=cfg.beta, clip_range=cfg.clip_range, step_reduce=cfg.step_reduce)
        loss, weights = logp_gradient_weights(self.loss_fn, logp_now.view(G, B, T), logp_old.view(G, B, T),
                                              logp_ref.view(G, B, T), rewards, **loss_kwargs)
        weights = weights.view(len(rows), T)[:, train_steps] * (T / len(train_steps)) * share
        flat_w = weights.reshape(-1)
        keep = torch.ones_like(flat_w, dtype=torch.bool) if on_policy else flat_w != 0
        recomputed = self._logprobs(batch, r_idx[keep], t_idx[keep], flat_w[keep], epoch, "update")
        stats = {"loss": loss.item(),
                 "clip_frac": clip_fraction(logp_now[:, train_steps], logp_old[:, train_steps],
                                            cfg.clip_range, cfg.algorithm),
                 "onpolicy_max_diff": float("nan"), "agreed": 0.0, "pairs": 0}
        if cfg.algorithm == "prdp":
            fraction, count = pair_agreement(logp_now.view(G, B, T), logp_ref.view(G, B, T), rewards, cfg.step_reduce)
            stats.update(agreed=fraction * count if count else 0.0, pairs=count)
        if on_policy and len(recomputed):
            stats["onpolicy_max_diff"] = (recomputed - batch.traj.logp[r_idx, t_idx]).abs().max().item()
        return stats

    def _sum_over_ranks(self, params: List[torch.Tensor], *numbers: float) -> List[float]:
        """Sum the LoRA gradients and `numbers` over ranks in one all-reduce per optimizer step,
        which also carries the stop and failure flags: a stop, or an error, on any rank ends
        every rank at this step. A single process returns `numbers` unchanged."""
        if not self.dist.enabled:
            return list(numbers)
        grads = [p.grad.reshape(-1).double() for p in params]
        extra = torch.tensor([*numbers, float(self.stop_event.is_set()), float(self._faults.failed)],
                             dtype=torch.float64, device=grads[0].device)
        packet = self.dist.sum_(torch.cat(grads + [extra]))
        self._faults.check(packet[-1].item() > 0)
        offset = 0
        for p in params:
            p.grad.copy_(packet[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        if packet[-2].item() > 0:
            self.stop_event.set()
            raise StopRequested()
        return packet[offset:-2].tolist()

    def _train_steps(self, generator: torch.Generator, T: int) -> torch.Tensor:
        """T: the trajectories' log-prob columns (the policy's stochastic steps)."""
        count = max(1, round(T * self.config.timestep_fraction))
        if count >= T:
            return torch.arange(T)
        return torch.randperm(T, generator=generator)[:count].sort().values

    @staticmethod
    def _transitions(rows: torch.Tensor, steps: torch.Tensor):
        """Flattened (row, step) index pairs, row-major."""
        return rows.repeat_interleave(len(steps)), steps.repeat(len(rows))

    def current_logprobs(self, batch: EpochBatch) -> torch.Tensor:
        """log-probs [rows, trained steps] of the batch's recorded transitions under the current
        weights (no gradients): after an update, compare with batch.traj.logp."""
        rows, steps = self._all_transitions(*batch.traj.logp.shape)
        return self._logprobs(batch, rows, steps, None, 0, "re-evaluation").view_as(batch.traj.logp)

    def _all_transitions(self, n_rows: int, n_columns: int):
        return self._transitions(torch.arange(n_rows), torch.arange(n_columns))

    def _logprobs(self, batch: EpochBatch, rows: torch.Tensor, steps: torch.Tensor,
                  grad_weights: Optional[torch.Tensor], epoch: int, phase: str) -> torch.Tensor:
        """log-probs (float64, CPU) of transitions (rows[k], steps[k]), evaluated in the sampling
        batches' layout (`micro_batches`). With grad_weights, also back-propagates
        sum(grad_weights * logp) into the LoRA (gradients accumulate; float16 models: times the
        loss scale). The values reach the CPU in one copy at the end."""
        cfg = self.config
        traj = batch.traj
        scale = None if grad_weights is None or self.loss_scale is None else self.loss_scale.scale
        values, places = [], []
        for index in micro_batches(rows, steps, cfg.sample_batch_size, cfg.train_batch_size):
            self._check_stop()
            r, s = rows[index], steps[index]
            args = (traj, r, s, index_cond(batch.cond, r), index_cond(batch.uncond, r))
            kwargs = dict(cfg=cfg.cfg, eta=cfg.eta, reduce=cfg.logprob_reduce)
            if grad_weights is None:
                with torch.no_grad():
                    logp = recorded_logprob(self.backend, *args, **kwargs)
            else:
                with torch.enable_grad():
                    logp = recorded_logprob(self.backend, *args, **kwargs)
                    w = grad_weights[index].to(logp.device)
                    if scale is not None:
                        w = w * scale      # a power of two: exact in float64
                    (w * logp).sum().backward()
                logp = logp.detach()
            values.append(logp)
            places.append(index)
            self._step(epoch, phase, len(index) * self._cfg_branches() * (1 if grad_weights is None else 3))
        out = torch.empty(len(rows), dtype=torch.float64)
        if values:
            out[torch.cat(places)] = torch.cat(values).cpu().double()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_root(self) -> Path:
        if self.out_dir is None:
            raise RuntimeError("checkpoints need an output directory")
        return self.out_dir / "checkpoints"

    def _mark_epoch_start(self) -> None:
        """Remember the state at this epoch boundary: a stop in the middle of the epoch
        checkpoints it, so a resume repeats the whole unfinished epoch exactly."""
        self._epoch_start = checkpoints.TrainerSnapshot.take(
            self.epoch, self.backend.lora_state_dict(), self.optimizer.state_dict(), self.extra_state())

    def save_checkpoint(self, partial: bool = False) -> Optional[Path]:
        """LoRA, optimizer, RNG, epoch, metrics and extra state into
        out_dir/checkpoints/epoch_NNNNN[_stopped]/ (format: runs/checkpoints.py). Stopped in the
        middle of an epoch, the state from the epoch's start is written."""
        if self.out_dir is None:
            return None
        snapshot = getattr(self, "_epoch_start", None)
        if snapshot is None or snapshot.epoch != self.epoch:      # at an epoch boundary
            snapshot = checkpoints.TrainerSnapshot(self.epoch, self.backend.lora_state_dict(),
                                                   self.optimizer.state_dict(), self.extra_state(),
                                                   torch.get_rng_state())
        target = checkpoints.write_checkpoint(
            self._checkpoint_root(), self.epoch, partial, lora=snapshot.lora, lora_metadata=self.lora_file_metadata(),
            optimizer_state_dict=snapshot.optimizer, metrics=self.metrics[: self.epoch],
            config=self.config.to_dict(), extra=snapshot.extra, rng=snapshot.rng)
        self.callback({"type": "checkpoint", "epoch": self.epoch, "path": str(target)})
        return target

    def load_checkpoint(self, path: Path, rewrite_metrics: bool = True) -> None:
        """Restore a checkpoint folder (or a run folder's latest); everything is validated and
        checked against this model's LoRA before anything is changed. `rewrite_metrics`:
        metrics.jsonl is cut back to the checkpoint's epochs (where there is an output folder)."""
        data = checkpoints.read_checkpoint(Path(path))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        checkpoints.check_fits(data, self.backend.lora_state_dict(), params)
        self.backend.load_lora_state_dict(data.lora)
        self.optimizer.load_state_dict(checkpoints.optimizer_state_dict(data, self.optimizer))
        if data.rng is not None:
            torch.set_rng_state(data.rng)
        self.epoch = data.epoch
        self.metrics = list(data.metrics)[: self.epoch]
        self.load_extra_state(data.extra)
        if rewrite_metrics and self.out_dir is not None:
            self._rewrite_metrics()

    def save_final_lora(self) -> Optional[Path]:
        if self.lora_path is None:
            return None
        path = unique_path(self.lora_path)
        return save_lora(path, self.backend.lora_state_dict(), self.lora_file_metadata())

    def lora_file_metadata(self) -> Dict[str, str]:
        return lora_metadata(self.config, self.backend, getattr(self.reward, "name", "reward"),
                             self.epoch, len(self.prompts))

    # ------------------------------------------------------------------ metrics & events
    def _append_metrics(self, metrics: dict) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def _rewrite_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.metrics)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def _negative_cond(self):
        if self._uncond_one is None:
            self._uncond_one = self.backend.encode_prompts([self.config.negative_prompt])
        return self._uncond_one

    @contextlib.contextmanager
    def _stops_inside_model_calls(self):
        """In a single process a stop takes effect before the denoiser's next block
        (Backend.stop_check_modules), not only between steps: one batched step of a big model at
        a big size can take minutes. Only in the thread that runs the trainer (the hooks are on
        modules that a ComfyUI server may use elsewhere). Distributed ranks stop together at their
        collectives instead (_sync_stop), so that none is left waiting in one."""
        if self.dist.enabled:
            yield
            return
        owner = threading.get_ident()

        def stop_here(module, args):
            if self.stop_event.is_set() and threading.get_ident() == owner:
                raise StopRequested()
        handles = [module.register_forward_pre_hook(stop_here) for module in self.backend.stop_check_modules()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_stop(self) -> None:
        """A stop raises at once in a single process. Distributed, ranks stop together at the
        next point every rank reaches (_sync_stop, _sum_over_ranks), so they end at the same step."""
        if self.stop_event.is_set() and not self.dist.enabled:
            raise StopRequested()

    def _sync_stop(self) -> None:
        """Raise StopRequested on every rank when a stop was asked for on any rank, and
        RankFailed when the work of any rank raised since the last collective."""
        stop, failed = self.dist.flags(self.stop_event.is_set(), self._faults.failed)
        self._faults.check(failed)
        if stop:
            self.stop_event.set()
            raise StopRequested()

    def _gather_rows(self, batch: EpochBatch, values: torch.Tensor) -> torch.Tensor:
        """Per-trajectory `values` of every rank, in the order a single process has them."""
        B = self.config.images_per_prompt
        return self.dist.gather_rows(values, [n * B for n in self.dist.shard_sizes(len(batch.all_prompts))])

    def _announce_epoch_estimate(self, epoch: int, inputs: tuple) -> None:
        """Before the run's first sampling: time one model evaluation of one image (after an
        untimed one that loads the model and its kernels) and announce
        what an epoch should cost (event "estimate"), so a setting whose first step alone takes
        minutes shows its cost at once rather than no ETA. One image per evaluation overestimates
        where batching helps (GPUs); gradient checkpointing's recomputation adds to training."""
        cond = index_cond(inputs[2], torch.arange(1))
        schedule = policy_for(self.config, self.backend).schedule(self.backend, self.config.steps)
        x = torch.zeros(1, *self.latent_shape, dtype=self.backend.dtype, device=self.backend.device)
        times = schedule.times[:1].to(self.backend.device)
        with torch.no_grad():
            self.backend.predict(x, times, cond).reshape(-1)[0].item()    # warm-up: loading, kernels
            start = time.perf_counter()
            self.backend.predict(x, times, cond).reshape(-1)[0].item()
        seconds = time.perf_counter() - start
        evaluations = self._image_evaluations_per_epoch()
        self.callback({"type": "estimate", "epoch": epoch + 1, "seconds_per_evaluation": seconds,
                       "evaluations_per_epoch": evaluations, "epoch_seconds": seconds * evaluations})

    def _cfg_branches(self) -> int:
        return 1 if self.config.cfg == 1.0 else 2

    def _trained_step_indices(self) -> set:
        """Sampling steps with a log-prob (the policy's stochastic steps)."""
        if self._trained_steps is None:
            schedule = policy_for(self.config, self.backend).schedule(self.backend, self.config.steps)
            self._trained_steps = set(schedule.trained.tolist())
        return self._trained_steps

    def _image_evaluations_per_epoch(self) -> int:
        """Model evaluations of one image (one CFG branch) per epoch on this rank, a forward and
        backward counted as 3 (TrainConfig.model_evaluations_per_epoch, for the policy in use;
        an upper bound: clipped rows skip the gradient pass)."""
        policy = policy_for(self.config, self.backend).name
        counts = self.config.replace(policy=policy).model_evaluations_per_epoch()
        total = (counts["sampling"] + counts["reference"] + counts["update_forward_no_grad"]
                 + 3 * counts["update_forward_backward"])
        return math.ceil(total / self.dist.world_size)

    def _step(self, epoch: int, phase: str, evaluations: int) -> None:
        """One model call done, worth `evaluations` one-image evaluations (the progress unit of
        _image_evaluations_per_epoch, so the fraction and the ETA follow the compute)."""
        self._check_stop()
        self._progress_units += evaluations
        per_epoch = self._image_evaluations_per_epoch()
        within = min(1.0, self._progress_units / per_epoch)
        self.callback({"type": "step", "epoch": epoch + 1, "phase": phase, "step": self._progress_units,
                       "total": per_epoch, "progress": (epoch + within) / self.config.epochs})

    def _event_phase(self, epoch: int, phase: str) -> None:
        self._faults.phase = f"epoch {epoch + 1} {phase}"
        self._faults.attempt(self.callback, {"type": "phase", "epoch": epoch + 1, "phase": phase})


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite, in one device-to-host sync (one inf-norm
    per tensor: NaN and inf propagate, finite values cannot overflow)."""
    maxima = torch._foreach_norm([t.detach() for t in tensors], math.inf)
    device = maxima[0].device           # factors ComfyUI left on another device (lowvram) join it
    return bool(torch.isfinite(torch.stack([m.to(device) for m in maxima])).all())


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint folder of a run directory (see checkpoints.latest_checkpoint)."""
    return checkpoints.latest_checkpoint(out_dir)
