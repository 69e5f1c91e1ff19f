"""Instrument a Trainer for the update-exactness tests: the batch its update trained on, each
optimizer step's gradients and the weights right after it, recorded as the trainer runs."""
from __future__ import annotations

from typing import List

import torch


class EpochRecorder:
    """Wraps `trainer.update` and `trainer.optimizer.step` (the originals still run)."""

    def __init__(self, trainer):
        self.params = list(trainer.backend.trainable_parameters())
        self.batch = None                                   # the last EpochBatch update() got
        self.grads: List[List[torch.Tensor]] = []           # per step: each parameter's gradient
        self.weights_after: List[List[torch.Tensor]] = []   # per step: each parameter after it
        original_update, original_step = trainer.update, trainer.optimizer.step

        def update(batch, epoch):
            self.batch = batch
            return original_update(batch, epoch)

        def step(*args, **kwargs):
            self.grads.append([p.grad.detach().clone() for p in self.params])
            result = original_step(*args, **kwargs)
            self.weights_after.append([p.detach().clone() for p in self.params])
            return result

        trainer.update, trainer.optimizer.step = update, step

