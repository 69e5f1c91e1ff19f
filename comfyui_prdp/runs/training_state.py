"""What a training run writes and restores: checkpoints (the state at an epoch's start, for a
stop in the middle of it), the final LoRA and its metadata, metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from ..lora.files import atomic_write, lora_metadata, save_lora, unique_path
from . import checkpoints


class TrainingState:
    """Trainer's checkpoint, LoRA and metrics files (a mixin of Trainer; format: checkpoints.py)."""

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

    def _checkpoint_root(self) -> Path:
        if self.out_dir is None:
            raise RuntimeError("checkpoints need an output directory")
        return self.out_dir / "checkpoints"

    def _mark_epoch_start(self) -> None:
        """Remember the state at this epoch boundary: a stop in the middle of the epoch
        checkpoints it, so a resume repeats the whole unfinished epoch exactly."""
        self._epoch_start = checkpoints.TrainerSnapshot.take(
            self.epoch, self.backend.lora_state_dict(), self.optimizer.state_dict(), self.extra_state())

    def return_to_epoch_start(self) -> bool:
        """After a stop inside an unfinished epoch, put the LoRA and the optimizer back to that
        epoch's start: the LoRA kept, the MODEL a ComfyUI node returns, the checkpoint and
        "stopped at epoch k" then all describe the same k finished epochs. True when an unfinished
        epoch's steps were undone."""
        snapshot = getattr(self, "_epoch_start", None)
        if snapshot is None or snapshot.epoch != self.epoch:
            return False
        self.backend.load_lora_state_dict(snapshot.lora)
        self.optimizer.load_state_dict(snapshot.optimizer)
        return True

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
