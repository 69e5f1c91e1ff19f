"""One rank of the distributed trainer tests (tests/test_distributed.py), started with
torch.multiprocessing.spawn on gloo. Runs a list of toy-backend jobs in order and writes each
job's LoRA, metrics and outcome under the job's folder, per rank."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_prdp.config import TrainConfig
from comfyui_prdp.distributed import Distributed
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = ["a red apple", "a blue sky", "a green field", "a white cloud", "a black cat"]


def toy_config(**overrides) -> TrainConfig:
    base = dict(epochs=2, prompts_per_epoch=3, images_per_prompt=4, updates_per_epoch=2, minibatch_prompts=2,
                steps=4, cfg=3.0, width=32, height=32, beta=0.05, clip_range=0.05, learning_rate=0.02,
                sample_batch_size=3, train_batch_size=5, lora_rank=4, seed=3)
    base.update(overrides)
    return TrainConfig().replace(**base).validate()


def run_job(job: dict, dist: Distributed) -> dict:
    """Train as `job` says: config overrides, out folder, optional resume folder, optional
    stop (on which rank, at which event), optional last epoch of this process."""
    config = toy_config(**job.get("config", {}))
    stop = threading.Event()
    stop_at = job.get("stop")   # {"rank", "epoch", "phase", "event"}: stop at the first such event
    stops_here = stop_at is not None and (not dist.enabled or dist.rank == stop_at["rank"])  # 1 process: it

    def callback(event):
        if (stops_here and event["type"] == stop_at["event"] and event["epoch"] == stop_at["epoch"]
                and event["phase"] == stop_at["phase"]):
            stop.set()

    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, config, out_dir=Path(job["out"]),
                      callback=callback, stop_event=stop, distributed=dist)
    if "until_epoch" in job:
        trainer.config = trainer.config.replace(epochs=job["until_epoch"])
    result = trainer.run(resume_from=Path(job["resume"]) if job.get("resume") else None)
    return {"trainer": trainer, "result": result}


def save_outcome(folder: Path, rank: int, trainer: Trainer, result) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trainer.backend.lora_state_dict().items()},
              str(folder / f"lora_rank{rank}.safetensors"))
    (folder / f"outcome_rank{rank}.json").write_text(json.dumps({
        "stopped": result.stopped, "epochs_done": result.epochs_done, "metrics": result.metrics,
        "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
        "lora": str(result.lora_path) if result.lora_path else None}))


def main(rank: int, world: int, init_file: str, jobs_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dist = Distributed(rank, world, rank, torch.device("cpu"))
        for job in json.loads(Path(jobs_file).read_text()):
            done = run_job(job, dist)
            save_outcome(Path(job["report"]), rank, done["trainer"], done["result"])
    finally:
        torch.distributed.destroy_process_group()
