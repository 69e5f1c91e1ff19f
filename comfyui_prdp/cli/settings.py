"""The `train` command's settings: the argument parser, the prompts it reads, the TrainConfig it
makes, and the cheap checks of --base and --device before anything is loaded."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

from ..config import PRESETS, TrainConfig, preset
from ..prompts import PromptTextError, open_prompt_file

DEFAULT_PROMPTS = [f"a painting of a {animal}" for animal in (
    "cat", "dog", "horse", "rabbit", "fox", "owl", "bear", "deer", "lion", "turtle", "goat", "duck")]
HELD_OUT_PROMPTS = ["a painting of a wolf", "a painting of a frog", "a painting of a crow", "a painting of a seal"]
#: images per held-out prompt, each with its own seed (evaluation.distinct_seed_rows from HELD_OUT_FIRST_SEED):
#: the embedded texture model barely reads its prompt, so images sharing a seed are near-duplicates
HELD_OUT_IMAGES_PER_PROMPT = 16
#: images per held-out prompt shown in before_after.png (all of them are scored)
GRID_IMAGES_PER_PROMPT = 4
HELD_OUT_FIRST_SEED = 1000


def finite_float(text: str) -> float:
    """argparse type: a finite number (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a value such as 3e-4")
    return value


# CLI flag -> TrainConfig field, for the common overrides
OVERRIDES = {
    "epochs": int, "prompts_per_epoch": int, "images_per_prompt": int, "updates_per_epoch": int,
    "minibatch_prompts": int, "steps": int, "cfg": finite_float, "eta": finite_float, "width": int,
    "height": int, "beta": finite_float, "clip_range": finite_float, "learning_rate": finite_float,
    "weight_decay": finite_float, "grad_clip": finite_float, "lora_rank": int, "lora_alpha": finite_float,
    "sample_batch_size": int, "train_batch_size": int, "checkpoint_every": int,
    "timestep_fraction": finite_float, "algorithm": str, "mixed_precision": str,
    "negative_prompt": str, "logprob_reduce": str, "step_reduce": str,
    "adv_clip": finite_float, "ddpo_advantages": str, "ddpo_buffer_size": int, "ddpo_min_count": int,
    "eval_every": int, "eval_prompts": int, "eval_seeds": int, "early_stop_patience": int,
    # flow models (SD3 / Flux): the policy and its options, Flux.1-dev's distilled guidance
    "policy": str, "flow_noise_level": finite_float, "flow_sde_variant": str, "flow_guidance": finite_float,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_prdp",
                                     description="PRDP reward finetuning of a diffusion model's LoRA")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a PRDP finetune",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--out", type=Path, default=None,
                       help="output folder (new, or an earlier run with --resume); required except with --list-rewards")
    train.add_argument("--base", default=None,
                       help="diffusers folder (SD1.x/2.x, SDXL, SD3/SD3.5, Flux.1), single-file SD/SDXL "
                            "checkpoint or cached hub id; "
                            "default: the embedded tiny model")
    train.add_argument("--base-config", default=None,
                       help="for a single-file --base: a local diffusers folder of the same architecture "
                            "whose configs and tokenizer are used (needed when they are not in the HF cache)")
    train.add_argument("--reward", default="jpeg-compressibility",
                       help="reward name (see --list-rewards) or 'weighted' with --reward-spec")
    train.add_argument("--reward-spec", default=None,
                       help="for --reward weighted: e.g. 'pickscore:10, hpsv2:2, aesthetic:0.05'")
    train.add_argument("--reward-path", default=None, help="weights file or folder of the reward model")
    train.add_argument("--prompts", type=Path, default=None,
                       help="prompt file: text (one prompt per line), .jsonl, .json list or .csv with a "
                            "prompt field/column; read lazily, so 100K+ prompts are fine")
    train.add_argument("--prompt-field", default=None,
                       help="JSON field or CSV column holding the prompt (default: the first of prompt, "
                            "caption, text; a CSV's only column)")
    train.add_argument("--eval-prompts-file", type=Path, default=None,
                       help="held-out prompts for --eval-every (any --prompts format); without it "
                            "--eval-prompts N prompts are split off the training prompts")
    train.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="hyperparameter preset (default: cpu-smoke without --base, consumer-gpu with it)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--no-eval", action="store_true", help="skip the before/after held-out images")
    train.add_argument("--list-rewards", action="store_true", help="print the reward names and exit")
    train.add_argument("--stop-file", type=Path, default=None,
                       help="stop with a checkpoint when this file appears (must not exist at the start); "
                            "SIGTERM stops with a checkpoint too")
    for name, kind in OVERRIDES.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    train.add_argument("--lora-targets", default=None, help="comma-separated module names, e.g. to_q,to_k,to_v,to_out.0")
    train.add_argument("--sde-window", default=None,
                       help="FIRST,STOP: only these steps are stochastic and trained, the rest deterministic (MixGRPO; approximate)")
    from .serve_reward import add_parser as add_serve_reward_parser
    add_serve_reward_parser(commands)
    return parser


def read_prompts(path: Optional[Path], field: Optional[str] = None) -> Sequence[str]:
    """The default prompts, or the prompts of a file (a lazy PromptSet)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        prompts = open_prompt_file(path, field=field, allow_empty=True)
    except (FileNotFoundError, PromptTextError) as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:
        raise SystemExit(f"error: prompt file {path} cannot be read ({error.strerror}); check the path "
                         "and its permissions") from None
    if not prompts:
        raise SystemExit(f"error: prompt file {path} has no prompts; write one prompt per line")
    return prompts


def make_config(args) -> TrainConfig:
    name = args.preset or ("cpu-smoke" if args.base is None else "consumer-gpu")
    try:
        return preset(name, **flag_settings(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def flag_settings(args) -> dict:
    """The TrainConfig settings given as flags on this command line."""
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.lora_targets:
        overrides["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if getattr(args, "sde_window", None):
        try:
            overrides["sde_window"] = [int(part) for part in args.sde_window.split(",")]
        except ValueError:
            raise SystemExit(f"error: --sde-window {args.sde_window!r}: give two step numbers FIRST,STOP, "
                             "e.g. 0,4") from None
    return overrides


def explicit_settings(args) -> dict:
    """What --resume must honour: an explicit --preset's values, then the flags."""
    return {**(PRESETS[args.preset] if args.preset else {}), **flag_settings(args)}


def check_base(base: Optional[str], base_config: Optional[str]) -> None:
    """The cheap checks of --base and --base-config (a damaged model folder), before --out is touched."""
    from ..models.loading import ModelLoadError, check_model_folders

    try:
        check_model_folders(base, base_config)
    except (ModelLoadError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


def check_device(device: Optional[str]) -> None:
    from ..models.loading import ModelLoadError, check_device as check

    try:
        check(device)
    except ModelLoadError as error:
        raise SystemExit(f"error: --device: {error}") from None
