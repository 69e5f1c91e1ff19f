"""The node thread's side of a training job: progress bar, dashboard messages, and turning
ComfyUI's Cancel into a graceful stop.

The node's worker thread calls `wait_for_job`. Each job event goes to ComfyUI's progress bar
(whose hook raises InterruptProcessingException when the user pressed Cancel) and, as
websocket events, to the dashboard on the node (web/prdp.js):

    (every event also carries `workflow`, the id of the workflow the node was queued from)
    prdp.job     {job_id, node, name, status, epochs, phase?, message?, lora?, epochs_done?}
                 status "preparing" (Stop works from here on), "running", then a final one
                 ("finished" / "stopped" / "failed") with a one-line `message` for the user
    prdp.status  {job_id, node, phase, epoch, epochs, progress, eta_seconds, eta_paused, ballot}   (at most 1/s)
                 ballot: the id of the human reward's open ballot (GET /prdp/jobs/<job>/ballot), else
                 null; while one waits the phase reads "waiting for your choice (N of N prompts left)"
                 and the ETA is paused (the wait does not count as training time)
    prdp.epoch   {job_id, node, name, epoch, epochs, metrics, samples: [{src, reward, prompt}],
                  warnings: [text, ...], eta_seconds}   samples are small JPEG data URLs of the epoch's first images

Between events the interrupt flag is polled. On Cancel the job is asked to stop: the trainer
stops before the denoiser's next block (trainer._stops_inside_model_calls), drops the current step, writes a checkpoint and returns; then the exception is re-raised so
the node ends as interrupted. (Since ComfyUI 2025-10-13, after 0.3.64, Cancel may instead be
raised inside the job's own model calls, which clears the flag: the backend then stops the job
and the node re-raises, see nodes/train.py.)

No job outlives its node: whatever ends the wait, the node thread returns only once the job
has ended (ComfyUI resets cast buffers and memory limits after each node).
"""
from __future__ import annotations

import base64
import io
import logging
import math
import time
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from ..comfyui_prdp.service.jobs import FAILED, FINISHED, STOPPED, Job
from .common import send_event
from .image_text import caption_above

logger = logging.getLogger(__name__)

PROGRESS_UNITS = 1000
PREVIEW_MAX_SIZE = 512
PREVIEW_EVERY_SECONDS = 1.0     # the latest samples ride along with progress updates this often
THUMBNAIL_MAX_SIDE = 160
THUMBNAIL_QUALITY = 85
STATUS_EVERY_SECONDS = 1.0      # prdp.status (phase, progress, ETA) at most this often
POLL_SECONDS = 0.1
STILL_STOPPING_LOG_SECONDS = 30.0
PROMPT_CHARS_SHOWN = 120


def preview_image(images: torch.Tensor, caption: Optional[List[str]] = None) -> Optional[Image.Image]:
    """[k, H, W, 3] 0..1 -> one PIL image with the k samples side by side, under a caption
    (so the progress preview reads as a training sample, not as the node's output)."""
    if images is None or images.dim() != 4 or images.shape[0] == 0:
        return None
    row = torch.cat(list(images.detach().float().clamp(0, 1).cpu()), dim=1)   # [H, k*W, 3]
    array = (row * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(np.ascontiguousarray(array[..., :3]))
    return caption_above(picture, caption) if caption else picture


def preview_caption(event: dict, epochs: int) -> List[str]:
    """'training samples, epoch 2/5', the rewards of the images shown, and the first prompt."""
    rewards = [_finite_or_none(r) for r in (event.get("preview_rewards") or [])]
    shown = "  ".join("-" if r is None else f"{r:.3g}" for r in rewards)
    prompts = event.get("preview_prompts") or []
    lines = [f"training samples, epoch {event.get('epoch')}/{epochs}"]
    if shown:
        lines.append(f"reward {shown}")
    if prompts:
        lines.append(str(prompts[0]))
    return lines


def thumbnails(images: Optional[torch.Tensor], max_side: int = THUMBNAIL_MAX_SIDE) -> List[str]:
    """[k, H, W, 3] 0..1 -> k small JPEG images as data: URLs (what the dashboard shows)."""
    if images is None or not isinstance(images, torch.Tensor) or images.dim() != 4:
        return []
    urls = []
    for image in images.detach().float().clamp(0, 1).cpu():
        array = (image[..., :3] * 255).round().to(torch.uint8).numpy()
        picture = Image.fromarray(np.ascontiguousarray(array))
        picture.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls


def _finite_or_none(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def epoch_samples(event: dict) -> List[dict]:
    """The epoch's preview images with their reward and prompt, for the dashboard."""
    rewards = list(event.get("preview_rewards") or [])
    prompts = list(event.get("preview_prompts") or [])
    samples = []
    for index, src in enumerate(thumbnails(event.get("preview"))):
        prompt = str(prompts[index]) if index < len(prompts) else ""
        samples.append({"src": src, "reward": _finite_or_none(rewards[index]) if index < len(rewards) else None,
                        "prompt": prompt[:PROMPT_CHARS_SHOWN]})
    return samples


# Ranges outside which the dashboard warns (README "Dashboard warnings"). kl is the summed
# per-step KL of the sampled trajectories to the base model: runs at the presets' settings stay
# below about 1 (cpu-smoke 1.1 after 10 epochs, world-demo 0.25; the paper's beta keeps it
# smaller still), while a learning rate 1000x too high reaches hundreds. clip_frac is the share
# of trained steps whose log-ratio moved past clip_range in an update: the presets' runs stay
# under about 0.1; past one half the proximal clip binds almost everywhere, so the updates are
# too large for clip_range (learning rate too high, or updates_per_epoch too many).
KL_WARN_ABOVE = 10.0
CLIP_FRAC_WARN_ABOVE = 0.5


def metric_warnings(metrics: Optional[dict]) -> List[str]:
    """What in an epoch's metrics is outside the sane ranges above, as lines for a person."""
    metrics = metrics or {}
    warnings = []
    kl = metrics.get("kl")
    if isinstance(kl, (int, float)) and (not math.isfinite(kl) or kl > KL_WARN_ABOVE):
        warnings.append(f"kl {kl:.3g} > {KL_WARN_ABOVE:g}: the LoRA has moved far from the base model; "
                        "lower learning_rate or raise beta")
    clip = metrics.get("clip_frac")
    if isinstance(clip, (int, float)) and (not math.isfinite(clip) or clip > CLIP_FRAC_WARN_ABOVE):
        warnings.append(f"clip {clip:.2f} > {CLIP_FRAC_WARN_ABOVE:g}: most steps hit clip_range; lower "
                        "learning_rate or updates_per_epoch")
    return warnings


class EtaClock:
    """Seconds left from the progress made since the first measured step (a resumed run starts
    at its checkpoint's fraction, so only this session's rate counts). Time between pause() and
    resume() (a person choosing) is not counted."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.start: Optional[tuple] = None
        self.paused_at: Optional[float] = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def pause(self) -> None:
        if self.paused_at is None:
            self.paused_at = self.clock()

    def resume(self) -> None:
        if self.paused_at is None:
            return
        waited, self.paused_at = self.clock() - self.paused_at, None
        if self.start is not None:
            self.start = (self.start[0] + waited, self.start[1])

    def eta(self, progress: float) -> Optional[float]:
        if self.paused_at is not None:
            return None
        now = self.clock()
        if self.start is None:
            self.start = (now, progress)
            return None
        started, first = self.start
        done = progress - first
        if done <= 0 or now <= started:
            return None
        return max(0.0, (now - started) * (1.0 - progress) / done)


def end_message(status: str, epochs_done: Optional[int], epochs: int, error: str = "") -> str:
    """How the run ended, for the user: 'finished: 5 of 5 epochs', 'stopped at epoch 2 of 5', ..."""
    done = "?" if epochs_done is None else str(epochs_done)
    if status == FINISHED:
        return f"finished: {done} of {epochs} epochs"
    if status == STOPPED and epochs_done == 0:
        return f"stopped before epoch 1 of {epochs} finished: nothing was trained"
    if status == STOPPED:
        return f"stopped at epoch {done} of {epochs}"
    if status == FAILED:
        return f"failed at epoch {done} of {epochs}: {error or 'see the ComfyUI log'}"
    return f"{status} at epoch {done} of {epochs}"


class ComfyProgress:
    """Forwards one job's events to ComfyUI's progress bar and to the node's dashboard.

    Made before the job is launched, so the dashboard shows "preparing: ..." and its Stop
    button works while the model is copied and the prompts are encoded."""

    def __init__(self, job: Job, node_id: Optional[str], total_epochs: int, clock=time.monotonic):
        import comfy.utils  # ComfyUI only

        self.job = job
        self.node_id = node_id
        self.total_epochs = total_epochs
        self.bar = comfy.utils.ProgressBar(PROGRESS_UNITS, node_id=node_id)
        self.value = 0
        self.clock = clock
        self.eta = EtaClock(clock)
        self.eta_seconds: Optional[float] = None
        self.status_sent = -math.inf
        self.preview = None
        self.preview_sent = 0.0
        self.ballot: Optional[str] = None      # the human reward's open ballot, while it waits
        self._send("prdp.job", {"name": job.name, "status": "preparing", "epochs": total_epochs,
                                "phase": job.phase or "preparing"})

    def _send(self, event: str, data: dict) -> None:
        send_event(event, {"job_id": self.job.id, "node": self.node_id, "workflow": self.job.info.get("workflow"),
                           **data})

    def preparing(self, what: str) -> None:
        """Setup before the job runs (copying the model, encoding prompts): shown as the phase."""
        self.job.set_phase(f"preparing: {what}")
        self._send_status(force=True)

    def _preview(self, force: bool = False):
        """The latest samples, at most every PREVIEW_EVERY_SECONDS (or now when forced)."""
        if self.preview is None or (not force and self.clock() - self.preview_sent < PREVIEW_EVERY_SECONDS):
            return None
        self.preview_sent = self.clock()
        return ("JPEG", self.preview, PREVIEW_MAX_SIZE)

    def _send_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.status_sent < STATUS_EVERY_SECONDS:
            return
        self.status_sent = now
        snapshot = self.job.snapshot(with_metrics=False)
        self._send("prdp.status", {"phase": snapshot["phase"], "epoch": snapshot["epoch"],
                                   "epochs": self.total_epochs, "progress": snapshot["progress"],
                                   "status": snapshot["status"], "eta_seconds": self.eta_seconds,
                                   "eta_paused": self.eta.paused, "ballot": self.ballot})

    def _open_ballot(self) -> Optional[str]:
        """The id of the ballot that waits for an answer now (the human reward), else None."""
        box = getattr(self.job, "ballot_box", None)
        described = box.describe() if box is not None else None
        return described["id"] if described else None

    def _follow_ballot(self, event: dict) -> None:
        """A ballot opened: pause the ETA and tell the dashboard (its id). Once it is answered
        (or closed, or the run stops) the next event resumes the ETA and says so at once."""
        kind = event.get("type")
        if kind == "ballot":
            self.ballot = self._open_ballot() or event.get("ballot")
            self.eta.pause()
            return
        if self.ballot is None:
            return
        if kind == "job_end" or self._open_ballot() != self.ballot:
            self.ballot = None
            self.eta.resume()
            self.status_sent = -math.inf      # the next status goes out now: the panel closes

    def forward(self, event: dict) -> None:
        kind = event.get("type")
        self._follow_ballot(event)
        if kind == "ballot":
            self._send_status(force=True)
        elif kind == "step":
            progress = float(event.get("progress", 0))
            measured = self.eta.eta(progress)
            self.eta_seconds = measured if measured is not None else self.eta_seconds   # else the estimate
            self.value = max(self.value, min(PROGRESS_UNITS, int(round(progress * PROGRESS_UNITS))))
            self.bar.update_absolute(self.value, PROGRESS_UNITS, self._preview())
            self._send_status()
        elif kind == "phase":
            self._send_status(force=True)
        elif kind == "estimate":      # before the first step: the run's cost from one model evaluation
            epochs_left = self.total_epochs - int(event.get("epoch", 1)) + 1
            self.eta_seconds = float(event["epoch_seconds"]) * epochs_left
            self._send_status(force=True)
        elif kind == "epoch":
            image = preview_image(event.get("preview"), preview_caption(event, self.total_epochs))
            if image is not None:
                self.preview = image
            self.bar.update_absolute(self.value, PROGRESS_UNITS, self._preview(force=True))
            samples = epoch_samples(event)
            metrics = self.job.snapshot(with_metrics=False)["latest_metrics"]
            warnings = metric_warnings(metrics)
            self.job.keep_samples(event.get("epoch"), samples)     # shown again after a reload
            self.job.outputs["warnings"] = warnings
            self._send("prdp.epoch", {"name": self.job.name, "epoch": event.get("epoch"), "epochs": self.total_epochs,
                                      "metrics": metrics, "samples": samples, "warnings": warnings,
                                      "eta_seconds": self.eta_seconds})
        elif kind == "checkpoint":
            self._send("prdp.checkpoint", {"epoch": event.get("epoch")})
        elif kind == "job_end":
            status = event.get("status")
            if status == FINISHED:
                self.value = PROGRESS_UNITS
                self.bar.update_absolute(self.value, PROGRESS_UNITS)
            self.send_end(status)

    def send_end(self, status: str) -> None:
        """The final prdp.job event, with the message the dashboard and its toast show."""
        epochs_done = getattr(self.job.result, "epochs_done", None)
        if epochs_done is None:
            epochs_done = self.job.epoch if status != FINISHED else self.total_epochs
        lora = str(self.job.outputs.get("lora") or "")
        message = end_message(status, epochs_done, self.total_epochs, self.job.error or "")
        if status != FAILED:
            message += f"; LoRA: {lora}" if lora else "; no LoRA written"
        self.job.outputs["message"] = message        # the dashboard shows it again after a reload
        self._send("prdp.job", {"status": status, "epochs": self.total_epochs, "epochs_done": epochs_done,
                                "lora": lora, "message": message})


def forward_the_rest(job: Job, progress: ComfyProgress) -> None:
    """Forward the events an ended job left queued (its job_end among them); a failure here is
    logged, never raised over the error that ended the wait."""
    try:
        while (event := job.next_event()) is not None:
            progress.forward(event)
    except Exception as error:        # noqa: BLE001 - the caller re-raises the error that matters
        logger.warning("PRDP job %s: could not send its last events (%s: %s)", job.id, type(error).__name__, error)


def stop_and_wait(job: Job, log_every: float = STILL_STOPPING_LOG_SECONDS) -> None:
    """Ask the job to stop (a no-op when it has ended) and block until it has ended."""
    job.request_stop()
    while not job.wait(log_every):
        logger.warning("PRDP job %s is still stopping (it stops before the model's next block, then saves)", job.id)


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
            logger.info("PRDP job %s: Cancel pressed, stopping before the model's next block", job.id)
        else:
            logger.error("PRDP job %s: the node failed while waiting (%s: %s); stopping the job",
                         job.id, type(error).__name__, error)
        stop_and_wait(job)
        forward_the_rest(job, progress)     # the dashboard learns how the run ended (on Cancel too)
        raise
    job.wait()     # job_end is queued just before the job is marked done
