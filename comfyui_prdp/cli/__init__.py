"""Command line: `python -m comfyui_prdp train --out DIR [...]`.

With no --base it finetunes the embedded tiny model (no download, no GPU) so the whole loop
can be watched on two CPU cores in minutes. Writes metrics.jsonl, lora.safetensors,
reward_curve.png and before_after.png (the same held-out seeds before and after).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..runs.stop_signals import check_stop_file
from .outdir import check_out_path, claim_out_dir, plan_out_dir
from .run import is_world_base, run_training, split_held_out
from .settings import (DEFAULT_PROMPTS, HELD_OUT_IMAGES_PER_PROMPT, HELD_OUT_PROMPTS, build_parser, check_base,
                       check_device, make_config, read_prompts)

__all__ = ["main", "train", "build_parser", "DEFAULT_PROMPTS", "HELD_OUT_PROMPTS", "HELD_OUT_IMAGES_PER_PROMPT"]


def train(args) -> int:
    if args.list_rewards:
        from ..rewards import available_rewards
        print("\n".join(available_rewards()))
        return 0
    if args.out is None:
        raise SystemExit("error: --out is required: the output folder of the run, e.g. --out runs/my_run")
    config = make_config(args)
    from .launch import join_ranks, train_ranks
    dist = join_ranks(args)       # a plain run: one process; under torchrun: this rank (launch.py)
    check_device(args.device)
    check_base(args.base, args.base_config)
    prompts = read_prompts(args.prompts, args.prompt_field)
    if args.prompts is None and is_world_base(args.base):
        from ..world.demo_eval import demo_train_prompts
        prompts = demo_train_prompts()     # the world's training captions (held-out ones stay unseen)
    if not args.resume:                        # (a resumed run's own settings are checked later)
        split_held_out(args, config, prompts)  # refused here, before --out is touched
    check_out_path(args.out)
    check_stop_file(args.stop_file)
    if dist.enabled:
        return train_ranks(args, config, prompts, dist)
    lock = claim_out_dir(args.out, args.resume)
    try:
        plan = plan_out_dir(args, config, prompts)
        if plan.finished:
            print(plan.finished)
            return 0
        return run_training(args, plan.config, prompts, plan.checkpoint)
    finally:
        lock.release()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; a refused input prints one 'error: ...' line and returns 2."""
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "serve-reward"):
        return 2
    try:
        if args.command == "serve-reward":
            from .serve_reward import serve
            return serve(args)
        return train(args)
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr)
        return 2
