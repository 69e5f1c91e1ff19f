"""A new held-out best counts only once best/ holds it (heldout.HeldOutMonitor.record): a failed
write of best/ leaves the monitor, the epoch's metrics and a checkpoint of them naming the
best that best/ still holds."""
import json

import pytest

from comfyui_prdp.runs import checkpoints
from comfyui_prdp import heldout
from comfyui_prdp.heldout import BEST_RECORD, best_checkpoint
from test_heldout_eval import eval_config, scheduled_trainer

DISK_FULL = "No space left on device (simulated)"


def test_a_failed_best_write_keeps_the_previous_best_in_the_state_and_its_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = scheduled_trainer(eval_config(epochs=2), out, {1: 0.2, 2: 0.9})    # epoch 2: a new best
    write = checkpoints.write_checkpoint

    def best_write_fails_at_epoch_2(root, epoch, *args, **kwargs):
        if root.name == heldout.BEST_FOLDER and epoch == 2:
            raise OSError(DISK_FULL)
        return write(root, epoch, *args, **kwargs)
    monkeypatch.setattr(heldout.checkpoints, "write_checkpoint", best_write_fails_at_epoch_2)
    with pytest.raises(OSError, match="No space left"):
        trainer.run()
    assert best_checkpoint(out).name == "epoch_00001"
    assert json.loads((out / "best" / BEST_RECORD).read_text())["epoch"] == 1
    monitor = trainer.held_out
    assert monitor.best == {"epoch": 1, "eval": pytest.approx(0.2), "train": pytest.approx(monitor.best["train"])}
    assert [e["epoch"] for e in monitor.evaluations] == [1] and monitor.strikes == 0
    assert trainer.metrics[-1]["epoch"] == 2 and "eval/is_best" not in trainer.metrics[-1]
    # the checkpoint a failure handler writes now names the best that exists
    saved = checkpoints.read_checkpoint(trainer.save_checkpoint(partial=True))
    assert saved.extra["held_out"]["best"]["epoch"] == 1
    assert "eval/best_epoch" not in saved.metrics[-1]
