"""One rank of the distributed trainer tests (tests/distributed/test_distributed.py), started with
torch.multiprocessing.spawn on gloo. Runs a list of toy-backend jobs in order and writes each
job's LoRA, metrics and outcome under the job's folder, per rank."""
from __future__ import annotations

import faulthandler
import json
import os
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.distributed.group import Distributed, init_from_env
from comfyui_prdp.heldout import HeldOutMonitor, held_out_split
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = ["a red apple", "a blue sky", "a green field", "a white cloud", "a black cat"]


def toy_config(**overrides) -> TrainConfig:
    base = dict(epochs=2, prompts_per_epoch=3, images_per_prompt=4, updates_per_epoch=2, minibatch_prompts=2,
                steps=4, cfg=3.0, width=32, height=32, beta=0.05, clip_range=0.05, learning_rate=0.02,
                sample_batch_size=3, train_batch_size=5, lora_rank=4, seed=3)
    base.update(overrides)
    return TrainConfig().replace(**base).validate()


class FailingReward(BrightnessReward):
    """BrightnessReward that raises `message` once armed (as a reward server that went away does)."""

    def __init__(self, message: str):
        super().__init__()
        self.message, self.armed = message, False

    def score_with_components(self, images, prompts):
        if self.armed:
            raise RuntimeError(self.message)
        return super().score_with_components(images, prompts)


def run_job(job: dict, dist: Distributed) -> dict:
    """Train as `job` says: config overrides, optional optimizer ("sgd"), out folder, optional resume folder, optional
    stop (on which rank, at which event), optional error (on which rank, in which phase of
    which epoch), optional last epoch of this process."""
    config = toy_config(**job.get("config", {}))
    stop = threading.Event()
    stop_at = job.get("stop")   # {"rank", "epoch", "phase", "event"}: stop at the first such event
    stops_here = stop_at is not None and (not dist.enabled or dist.rank == stop_at["rank"])  # 1 process: it
    fail = job.get("fail")      # {"rank", "epoch", "phase", "message"[, "event"]}: the reward, or the callback
    #                             at the phase's first event (default "step"; "epoch": the epoch's metrics), raises
    fails_here = fail is not None and (not dist.enabled or dist.rank == fail["rank"])
    reward = FailingReward(fail["message"]) if fails_here and fail.get("phase") == "reward" else BrightnessReward()

    def callback(event):
        if (stops_here and event["type"] == stop_at["event"] and event["epoch"] == stop_at["epoch"]
                and event["phase"] == stop_at["phase"]):
            stop.set()
        if fails_here and event.get("epoch") == fail["epoch"] and event.get("phase") == fail.get("phase"):
            if fail.get("phase") == "reward":
                reward.armed = True
            elif event["type"] == fail.get("event", "step"):   # e.g. out of memory in a model call of this rank
                raise RuntimeError(fail["message"])

    prompts, held_out = held_out_split(PROMPTS, config)      # (PROMPTS, None) without eval_every
    trainer = Trainer(ToyBackend(), reward, prompts, config, out_dir=Path(job["out"]),
                      callback=callback, stop_event=stop, distributed=dist)
    if held_out is not None:
        trainer.held_out = HeldOutMonitor(held_out, config)
    if job.get("optimizer") == "sgd":     # the step is proportional to the summed gradient (AdamW's is not)
        trainer.optimizer = torch.optim.SGD(trainer.backend.trainable_parameters(), lr=config.learning_rate)
    if "until_epoch" in job:
        trainer.config = trainer.config.replace(epochs=job["until_epoch"])
    resume = job.get("resume_on", {}).get(str(dist.rank), job.get("resume"))   # "resume_on": {rank: folder}
    result = trainer.run(resume_from=Path(resume) if resume else None)
    return {"trainer": trainer, "result": result}


def save_outcome(folder: Path, rank: int, trainer: Trainer, result) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trainer.backend.lora_state_dict().items()},
              str(folder / f"lora_rank{rank}.safetensors"))
    (folder / f"outcome_rank{rank}.json").write_text(json.dumps({
        "stopped": result.stopped, "epochs_done": result.epochs_done, "metrics": result.metrics,
        "early_stopped": result.early_stopped,
        "held_out": trainer.held_out.state_dict() if trainer.held_out is not None else None,
        "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
        "lora": str(result.lora_path) if result.lora_path else None}))


def save_error(folder: Path, rank: int, error: Exception) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = getattr(error, "checkpoint", None)
    (folder / f"error_rank{rank}.json").write_text(json.dumps({
        "type": type(error).__name__, "text": str(error), "checkpoint": str(checkpoint) if checkpoint else None,
        "failed_ranks": sorted(getattr(error, "failures", {}))}))


def main(rank: int, world: int, init_file: str, jobs_file: str) -> None:
    """Run the jobs; a job that raises is recorded (error_rank{rank}.json) and the next one
    runs; the process then exits non-zero."""
    faulthandler.enable()      # a rank that aborts (SIGABRT, seen once in ~50 runs) prints every thread's stack
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failed = []
    try:
        dist = Distributed(rank, world, rank, torch.device("cpu"))
        for job in json.loads(Path(jobs_file).read_text()):
            try:
                done = run_job(job, dist)
            except Exception as error:      # noqa: BLE001 - recorded for the test to judge
                save_error(Path(job["report"]), rank, error)
                failed.append(job["name"])
                continue
            save_outcome(Path(job["report"]), rank, done["trainer"], done["result"])
    finally:
        # every rank past its last collective before any tears its connections down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if failed:
        raise SystemExit(f"rank {rank}: jobs {failed} failed")


def timeout_main(rank: int, world: int, port: int, folder: str) -> None:
    """Join as torchrun's ranks do (init_from_env, $PRDP_DIST_TIMEOUT_MINUTES from the parent);
    rank 0 waits in an all-reduce rank 1 never joins and records how long until it raised;
    rank 1 stays alive (so no closed connection ends the wait) until that record exists."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    init_from_env("cpu")
    record = Path(folder) / "rank0_wait.json"
    if rank == 0:
        start = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.zeros(1))
            outcome = "returned"
        except Exception as error:      # noqa: BLE001 - recorded for the test to judge
            outcome = f"{type(error).__name__}: {str(error)[:300]}"
        record.write_text(json.dumps({"seconds": time.monotonic() - start, "outcome": outcome}))
    else:
        deadline = time.monotonic() + 120
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
