"""The CLI under torchrun: `torchrun --nproc_per_node=G [--nnodes ...] -m comfyui_prdp train ...`.

Every rank parses the same command line and runs the same cheap checks. Rank 0 alone claims
and plans the --out folder (lock, run record, which checkpoint to resume) and tells the other
ranks what it decided (or the error that ends the run) as JSON; then every rank loads the model
and trains its share (trainer.py, distributed/group.py); rank 0 alone prints and writes files. The
run folder must be on a filesystem every node sees (a resume reads the checkpoint on each rank).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from ..distributed.group import (SINGLE, Distributed, DistributedError, init_from_env, launched_by_torchrun,
                          rank_device, shutdown)


def join_ranks(args) -> Distributed:
    """SINGLE for a plain run; under torchrun, join the process group (NCCL on GPUs, gloo on
    CPUs) and set args.device to this rank's device (cuda:LOCAL_RANK)."""
    if not launched_by_torchrun():
        return SINGLE
    try:
        args.device = rank_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        return init_from_env(args.device)
    except (DistributedError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def train_ranks(args, config, prompts: List[str], dist: Distributed) -> int:
    """Plan the run on rank 0 (which holds the --out lock while it trains), then train on every rank."""
    from ..runs.run_folder import config_from_dict
    from .outdir import claim_out_dir, plan_out_dir
    from .run import run_training

    try:
        dist.check_shardable(config.prompts_per_epoch)     # every rank refuses alike, before loading
    except DistributedError as error:
        shutdown()
        raise SystemExit(f"error: {error}") from None
    lock, decision = None, None
    if dist.is_main:
        try:
            lock = claim_out_dir(args.out, args.resume)
            plan = plan_out_dir(args, config, prompts)
            checkpoint = plan.checkpoint.path if plan.checkpoint is not None else None
            decision = {"finished": plan.finished, "config": plan.config.to_dict(),
                        "checkpoint": str(checkpoint) if checkpoint is not None else None}
        except SystemExit as stop:
            decision = {"error": stop.code if isinstance(stop.code, str) else f"error: rank 0 exited ({stop.code})"}
    try:
        decision = dist.broadcast_json(decision)
        if "error" in decision:
            if dist.is_main:
                raise SystemExit(decision["error"])
            return 2          # rank 0 printed the error
        if decision["finished"]:
            if dist.is_main:
                print(decision["finished"])
            return 0
        planned = config_from_dict(decision["config"], args.out)
        checkpoint = Path(decision["checkpoint"]) if decision["checkpoint"] else None
        return run_training(args, planned, prompts, checkpoint, dist=dist)
    finally:
        if lock is not None:
            lock.release()
        shutdown()
