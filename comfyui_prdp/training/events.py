"""The events a run reports to its callback: phases, steps with the epoch's progress in
one-image model evaluations, and the epoch's cost estimated before the first sampling."""
from __future__ import annotations

import math
import time

import torch

from ..policies import policy_for
from ..sampling import index_cond


class ProgressEvents:
    """Trainer's progress events (a mixin of Trainer)."""

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
