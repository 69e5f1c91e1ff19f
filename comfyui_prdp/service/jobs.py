"""Background jobs: run a training function in its own thread, record its progress events,
let anyone ask it to stop, and keep a registry of running and finished jobs.

Knows nothing about ComfyUI. A fresh thread does not inherit ComfyUI's inference mode; the job
thread also turns inference mode off and gradients on explicitly before calling the target.

Typical use (the train node):

    job = JOBS.start(lambda job: trainer_run(job.stop_event, job.record), name="my_lora")
    # or, to be listed (and stoppable) while the caller still prepares the run:
    job = JOBS.create(name="my_lora"); job.set_phase("preparing: ..."); ...; JOBS.launch(job, target)
    while not job.done:
        event = job.next_event(timeout=0.1)   # forward to a progress bar, a websocket ...
    job.result / job.error
"""
from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

PENDING, RUNNING, STOPPING, FINISHED, STOPPED, FAILED = (
    "pending", "running", "stopping", "finished", "stopped", "failed")
FINAL_STATES = (FINISHED, STOPPED, FAILED)
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
EVENT_QUEUE_SIZE = 1000
#: outputs key the train node sets once it has returned the job's results to ComfyUI
DELIVERED = "delivered"


def _json_safe(value: Any) -> Any:
    """Plain JSON values only: numbers (NaN/inf -> None), strings, lists, dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _json_safe(value.item()) if value.numel() == 1 else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


class Job:
    """One background run. Thread-safe: the job thread records, other threads read."""

    def __init__(self, name: str = "", info: Optional[Dict[str, Any]] = None):
        self.id = uuid.uuid4().hex[:12]
        self.name = name
        self.info = dict(info or {})
        self.created = time.time()
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.status = PENDING
        self.error: Optional[str] = None
        self.exception: Optional[BaseException] = None
        self.result: Any = None
        self.progress = 0.0
        self.epoch = 0
        self.phase = ""
        self.metrics: List[dict] = []
        self.checkpoints: List[str] = []
        self.outputs: Dict[str, Any] = {}
        self.preview: Optional[torch.Tensor] = None
        self.samples: List[dict] = []          # the latest epoch's small sample images (JSON-safe dicts)
        self.samples_epoch: Optional[int] = None
        self.stop_event = threading.Event()
        #: the human reward's ballot box (rewards/human/ballots.py) when the job asks a person, else None
        self.ballot_box: Optional[Any] = None
        self._done = threading.Event()
        self._events: "queue.Queue[dict]" = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self._lock = threading.Lock()

    # --- control -------------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        """What the job is doing now, e.g. "preparing: copying the model" before it is launched."""
        with self._lock:
            self.phase = str(phase)

    def request_stop(self) -> bool:
        """Ask the job to stop gracefully; False when it had already ended."""
        with self._lock:
            if self.status in FINAL_STATES:
                return False
            self.stop_event.set()
            self.status = STOPPING
            return True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job ended (True) or the timeout passed (False)."""
        return self._done.wait(timeout)

    def next_event(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next recorded event, or None when none came within `timeout`."""
        try:
            return self._events.get(timeout=timeout) if timeout else self._events.get_nowait()
        except queue.Empty:
            return None

    def keep_samples(self, epoch: Optional[int], samples: List[dict]) -> None:
        """Keep the latest epoch's samples ({src, reward, prompt}, src a small data: URL), so a
        client that connects later (a reloaded page) can show them; an epoch without any keeps
        the previous ones."""
        if samples:
            with self._lock:
                self.samples, self.samples_epoch = list(samples), epoch

    # --- recording (called from the job thread) ---------------------------------------
    def record(self, event: dict) -> None:
        """Take one trainer event (see trainer.py): update the status and queue the event."""
        kind = event.get("type")
        with self._lock:
            if kind == "step":
                self.progress = float(event.get("progress", self.progress))
                self.phase = str(event.get("phase", self.phase))
                self.epoch = int(event.get("epoch", self.epoch))
            elif kind == "phase":
                self.phase = str(event.get("phase", ""))
                self.epoch = int(event.get("epoch", self.epoch))
            elif kind == "epoch":
                self.metrics.append(dict(event.get("metrics", {})))
                self.epoch = int(event.get("epoch", self.epoch))
                if event.get("preview") is not None:
                    self.preview = event["preview"]
            elif kind == "checkpoint":
                self.checkpoints.append(str(event.get("path")))
        self._put(event)

    def _put(self, event: dict) -> None:
        while True:
            try:
                self._events.put_nowait(event)
                return
            except queue.Full:  # nobody is listening: drop the oldest
                try:
                    self._events.get_nowait()
                except queue.Empty:
                    pass

    # --- reporting -------------------------------------------------------------------------
    def snapshot(self, with_metrics: bool = True) -> Dict[str, Any]:
        """A JSON-safe summary (never tensors, never file contents)."""
        with self._lock:
            data = {
                "id": self.id, "name": self.name, "status": self.status,
                "created": self.created, "started": self.started, "finished": self.finished,
                "progress": self.progress, "epoch": self.epoch, "phase": self.phase,
                "error": self.error, "stop_requested": self.stop_event.is_set(),
                "info": self.info, "checkpoints": list(self.checkpoints), "outputs": self.outputs,
                "latest_metrics": self.metrics[-1] if self.metrics else None,
            }
            if with_metrics:
                data["metrics"] = list(self.metrics)
                data["samples"] = list(self.samples)
                data["samples_epoch"] = self.samples_epoch
        return _json_safe(data)

    # --- running ---------------------------------------------------------------------------
    def _run(self, target: Callable[["Job"], Any]) -> None:
        with self._lock:
            self.started = self.started or time.time()
            if self.status == PENDING:
                self.status = RUNNING
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = target(self)
        except BaseException as error:  # noqa: BLE001  (reported to the waiting thread)
            with self._lock:
                self.exception = error
                self.error = f"{type(error).__name__}: {error}"
                self.status = FAILED
            logger.error("PRDP job %s (%s) failed:\n%s", self.id, self.name, traceback.format_exc())
        else:
            with self._lock:
                self.result = result
                stopped = bool(getattr(result, "stopped", False)) or self.stop_event.is_set()
                self.status = STOPPED if stopped else FINISHED
                self.progress = self.progress if stopped else 1.0
        finally:
            with self._lock:
                self.finished = time.time()
                self.preview = None          # finished jobs stay listed; their images need not
            self._put({"type": "job_end", "status": self.status})
            self._done.set()


class JobRegistry:
    """All jobs of this process: running ones and the most recent finished ones."""

    def __init__(self, keep_finished: int = 50):
        self.keep_finished = keep_finished
        self._jobs: Dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, target: Callable[[Job], Any], name: str = "", info: Optional[Dict[str, Any]] = None) -> Job:
        """Create a job and run `target(job)` in a new daemon thread."""
        return self.launch(self.create(name, info), target)

    def create(self, name: str = "", info: Optional[Dict[str, Any]] = None) -> Job:
        """A listed, pending job: it can be asked to stop before `launch` (the caller checks
        `job.stop_requested` while it prepares; a stop request survives the launch)."""
        job = Job(name, info)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        return job

    def launch(self, job: Job, target: Callable[[Job], Any]) -> Job:
        """Run `target(job)` for a job made by `create`, in a new daemon thread."""
        if job.started is not None:
            raise RuntimeError(f"job {job.id} was already launched")
        job.started = time.time()
        thread = threading.Thread(target=job._run, args=(target,), name=f"prdp-job-{job.id}", daemon=True)
        thread.start()
        return job

    def abandon(self, job: Job, error: Optional[BaseException], status: str = FAILED) -> None:
        """End a job that was never launched (its preparation failed or was cancelled): marked
        `status` (failed, or stopped), job_end queued."""
        if status not in FINAL_STATES:
            raise ValueError(f"status must be one of {FINAL_STATES}, not {status!r}")
        with job._lock:
            job.exception = error
            job.error = f"{type(error).__name__}: {error}" if error is not None else None
            job.status = status
            job.finished = time.time()
        job._put({"type": "job_end", "status": job.status})
        job._done.set()

    def get(self, job_id: str) -> Optional[Job]:
        """The job with this id, or None (ids that are not well-formed are never looked up)."""
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> List[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def last_run(self, node: str, workflow: Optional[str], delivered: bool = False) -> Optional[Job]:
        """The newest job started by node `node` of workflow `workflow` (the ids the node was
        queued with; None where the frontend gave the workflow no id), or None. `delivered`:
        only jobs whose node returned its outputs (what ComfyUI's cache can hold)."""
        matches = [job for job in self.jobs()
                   if str(job.info.get("node")) == node and job.info.get("workflow") == workflow
                   and (job.outputs.get(DELIVERED) or not delivered)]
        return matches[-1] if matches else None

    def running(self) -> List[Job]:
        return [job for job in self.jobs() if not job.done]

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.done), key=lambda j: j.created)
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]


#: the process-wide registry shared by the nodes and the HTTP routes
JOBS = JobRegistry()
