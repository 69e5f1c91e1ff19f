"""The online loop (Algorithm 1 of the paper, docs/algorithm.md section 3).

Each epoch: draw N prompts; sample B trajectories each with the current weights (theta_old),
recording latents and log-probs, and the base model's log-probs (adapters disabled) at the
same visited latents; decode and score; then K updates over prompt minibatches. Each update computes the exact
gradient in two passes: per-step weights w = dLoss/dlogp without gradients, then micro-batched
backward passes of sum(w * logp), so memory is one micro-batch whatever T and B are.

Randomness is derived from (seed, epoch), so resuming from a checkpoint at an epoch boundary
gives the same result as an uninterrupted run.
"""
from __future__ import annotations

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
from .objective import LOSSES, DynamicLossScale
from .prompts import PromptSet
from .runs import checkpoints
from .runs.stop_signals import StopRequested
from .runs.training_state import TrainingState
from .training.control import RunControl
from .training.events import ProgressEvents
from .training.sampling_phase import EpochSampling
from .training.update import PolicyUpdate, computes_in_float16

Callback = Callable[[dict], None]
CHECKPOINT_STATE = checkpoints.STATE_FILE
CHECKPOINT_LORA = checkpoints.LORA_FILE


@dataclass
class TrainResult:
    epochs_done: int
    stopped: bool
    metrics: List[dict] = field(default_factory=list)
    lora_path: Optional[Path] = None
    checkpoint_path: Optional[Path] = None
    early_stopped: bool = False        # the held-out early stop ended the run (heldout.py)


class Trainer(EpochSampling, PolicyUpdate, TrainingState, RunControl, ProgressEvents):
    """The online loop: `run` trains epoch after epoch (train_epoch: sample and score, update, report)."""

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
            self.return_to_epoch_start()      # keep only finished epochs (the checkpoint's state)
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


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint folder of a run directory (see checkpoints.latest_checkpoint)."""
    return checkpoints.latest_checkpoint(out_dir)
