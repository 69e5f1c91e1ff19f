"""The node thread's side of a training job: progress bar, previews, websocket messages, and
turning ComfyUI's Cancel into a graceful stop.

The node's worker thread calls `wait_for_job`. Each job event goes to ComfyUI's progress bar
(whose hook raises InterruptProcessingException when the user pressed Cancel); between events
the interrupt flag is polled. On Cancel the job is asked to stop: the trainer drops the current
step, writes a checkpoint and returns; then the exception is re-raised so the node ends as
interrupted. (Since ComfyUI 2025-10-13, after 0.3.64, Cancel may instead be raised inside the job's own model
calls, which clears the flag: the backend then stops the job and the node re-raises, see
nodes/train.py.)

No job outlives its node: whatever ends the wait, the node thread returns only once the job
has ended (ComfyUI resets cast buffers and memory limits after each node).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..comfyui_prdp.jobs import Job
from .common import send_event

logger = logging.getLogger(__name__)

PROGRESS_UNITS = 1000
PREVIEW_MAX_SIZE = 512
PREVIEW_EVERY_SECONDS = 1.0     # the latest samples ride along with progress updates this often
POLL_SECONDS = 0.1
STILL_STOPPING_LOG_SECONDS = 30.0


def preview_image(images: torch.Tensor) -> Optional[Image.Image]:
    """[k, H, W, 3] 0..1 -> one PIL image with the k samples side by side."""
    if images is None or images.dim() != 4 or images.shape[0] == 0:
        return None
    row = torch.cat(list(images.detach().float().clamp(0, 1).cpu()), dim=1)   # [H, k*W, 3]
    array = (row * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


class ComfyProgress:
    """Forwards one job's events to ComfyUI's progress bar and websocket."""

    def __init__(self, job: Job, node_id: Optional[str], total_epochs: int):
        import comfy.utils  # ComfyUI only

        self.job = job
        self.node_id = node_id
        self.total_epochs = total_epochs
        self.bar = comfy.utils.ProgressBar(PROGRESS_UNITS, node_id=node_id)
        self.value = 0
        self.preview = None
        self.preview_sent = 0.0
        send_event("prdp.job", {"job_id": job.id, "node": node_id, "name": job.name, "status": "running"})

    def _preview(self, force: bool = False):
        """The latest samples, at most every PREVIEW_EVERY_SECONDS (or now when forced)."""
        if self.preview is None or (not force and time.monotonic() - self.preview_sent < PREVIEW_EVERY_SECONDS):
            return None
        self.preview_sent = time.monotonic()
        return ("JPEG", self.preview, PREVIEW_MAX_SIZE)

    def forward(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "step":
            self.value = max(self.value, min(PROGRESS_UNITS, int(round(event.get("progress", 0) * PROGRESS_UNITS))))
            self.bar.update_absolute(self.value, PROGRESS_UNITS, self._preview())
        elif kind == "epoch":
            image = preview_image(event.get("preview"))
            if image is not None:
                self.preview = image
            self.bar.update_absolute(self.value, PROGRESS_UNITS, self._preview(force=True))
            send_event("prdp.epoch", {"job_id": self.job.id, "node": self.node_id, "name": self.job.name,
                                      "epoch": event.get("epoch"), "epochs": self.total_epochs,
                                      "metrics": self.job.snapshot(with_metrics=False)["latest_metrics"]})
        elif kind == "checkpoint":
            send_event("prdp.checkpoint", {"job_id": self.job.id, "node": self.node_id,
                                           "epoch": event.get("epoch"), "path": event.get("path")})
        elif kind == "job_end":
            if event.get("status") == "finished":
                self.value = PROGRESS_UNITS
                self.bar.update_absolute(self.value, PROGRESS_UNITS)
            send_event("prdp.job", {"job_id": self.job.id, "node": self.node_id, "status": event.get("status")})


def stop_and_wait(job: Job, log_every: float = STILL_STOPPING_LOG_SECONDS) -> None:
    """Ask the job to stop (a no-op when it has ended) and block until it has ended."""
    job.request_stop()
    while not job.wait(log_every):
        logger.warning("PRDP job %s is still stopping (it stops at its next model step)", job.id)


def wait_for_job(job: Job, progress: ComfyProgress, poll: float = POLL_SECONDS) -> None:
    """Block until the job ends, forwarding its events. On Cancel: stop the job gracefully,
    wait for its checkpoint, then re-raise InterruptProcessingException. Any other error here
    also stops the job and waits for it before it propagates."""
    import comfy.model_management as management  # ComfyUI only

    try:
        while True:
            event = job.next_event(timeout=poll)
            if event is not None:
                progress.forward(event)
                if event.get("type") == "job_end":
                    break
            elif job.done:      # nothing queued and finished (job_end already seen)
                break
            if management.processing_interrupted():
                management.throw_exception_if_processing_interrupted()
    except BaseException as error:
        if isinstance(error, management.InterruptProcessingException):
            logger.info("PRDP job %s: Cancel pressed, stopping after the current step", job.id)
        else:
            logger.error("PRDP job %s: the node failed while waiting (%s: %s); stopping the job",
                         job.id, type(error).__name__, error)
        stop_and_wait(job)
        raise
    job.wait()     # job_end is queued just before the job is marked done
