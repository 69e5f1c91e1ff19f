"""The run's stop and distributed plumbing: a stop inside the model's blocks (one process), ranks
that stop together at their collectives, and the rows every rank gathers."""
from __future__ import annotations

import contextlib
import threading

import torch

from ..runs.stop_signals import StopRequested
from .batches import EpochBatch


class RunControl:
    """Trainer's stop and distributed checks (a mixin of Trainer)."""

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
