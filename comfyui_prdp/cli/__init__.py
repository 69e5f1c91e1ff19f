"""Command line: `python -m comfyui_prdp train --out DIR [...]`.

With no --base it finetunes the embedded tiny model (no download, no GPU) so the whole loop
can be watched on two CPU cores in minutes. Writes metrics.jsonl, lora.safetensors,
reward_curve.png and before_after.png (the same held-out seeds before and after).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from ..config import PRESETS, TrainConfig, preset
from ..progress import format_duration
from ..prompts import PromptTextError, open_prompt_file
from ..runs.stop_signals import check_stop_file, stop_requests

DEFAULT_PROMPTS = [f"a painting of a {animal}" for animal in (
    "cat", "dog", "horse", "rabbit", "fox", "owl", "bear", "deer", "lion", "turtle", "goat", "duck")]
HELD_OUT_PROMPTS = ["a painting of a wolf", "a painting of a frog", "a painting of a crow", "a painting of a seal"]
#: images per held-out prompt, each with its own seed (evaluation.distinct_seed_rows from HELD_OUT_FIRST_SEED):
#: the embedded texture model barely reads its prompt, so images sharing a seed are near-duplicates
HELD_OUT_IMAGES_PER_PROMPT = 16
#: images per held-out prompt shown in before_after.png (all of them are scored)
GRID_IMAGES_PER_PROMPT = 4
HELD_OUT_FIRST_SEED = 1000

#: folders that hold no user files; an --out there is a mistake
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


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
    from ..rewards.server import add_parser as add_serve_reward_parser
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


def check_out_path(out: Path) -> None:
    """Refuse an --out that can never be a run folder: a file, a folder under a file, a system
    folder (/proc, /sys, /dev) or a place that cannot be written."""
    target = Path(os.path.abspath(out.expanduser()))
    resolved = target.resolve()
    for system in SYSTEM_FOLDERS:
        if resolved == system or system in resolved.parents:
            raise SystemExit(f"error: --out {out} is inside {system}, a system folder that holds no files; "
                             "choose a folder such as runs/my_run")
    if target.exists() and not target.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder; choose a new folder name")
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: --out {out} is under {existing}, which is a file, not a folder; choose "
                         "another --out")
    writable = target if target.exists() else existing
    if not os.access(writable, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {out}: {writable} is not writable; choose a folder you can write to")


def claim_out_dir(out: Path, resume: bool):
    """The --out folder, created if new and locked for this run (a RunLock to release)."""
    from ..runs.run_lock import FolderInUse, RunLock

    if resume and not out.is_dir():
        raise SystemExit(f"error: --resume: {out} does not exist; run without --resume first")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(out).acquire()
    except FolderInUse as error:
        raise SystemExit(f"error: {error}") from None


def plan_out_dir(args, config: TrainConfig, prompts: List[str]):
    """What this run does in its (locked) --out: a ResumePlan; checkpoints are read and
    checked here, before any model loads. See runs/run_folder.py for the folder states."""
    from ..runs import run_folder
    from ..runs.checkpoints import CheckpointError

    contents = run_folder.inspect(args.out)
    info = run_folder.run_info(args.base, args.reward, args.reward_spec, prompts, args.prompts)
    info["eval_prompts_file"] = str(args.eval_prompts_file) if args.eval_prompts_file else None
    try:
        if args.resume:
            plan = run_folder.plan_resume(contents, config, explicit_settings(args), info)
        else:
            note = run_folder.check_new_run(contents)
            plan = run_folder.ResumePlan(config, notes=[note] if note else [])
    except (run_folder.RunFolderError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.checkpoint is None and plan.finished is None:
        run_folder.write_run_record(args.out, plan.config, info)
    return plan


def make_reward(args):
    """The reward --reward, --reward-spec and --reward-path name (`train` and `serve-reward`),
    its models on the trainer's --device (cuda:1 too, not the first GPU); one refused ends the
    command with one 'error: ...' line."""
    from ..rewards import create_reward
    from ..rewards.loading import default_device
    from ..rewards.remote import RewardServerError
    kwargs = {}
    if args.reward == "weighted":
        if not args.reward_spec:
            raise SystemExit("error: --reward weighted needs --reward-spec, e.g. 'pickscore:10, hpsv2:2'")
        kwargs["components"] = args.reward_spec
    if args.reward_path:
        kwargs["path"] = args.reward_path
    try:
        with default_device(getattr(args, "device", None)):    # serve-reward has no --device
            return create_reward(args.reward, **kwargs)
    except (ValueError, FileNotFoundError, TypeError, RewardServerError) as error:   # a URL: server down or refusing
        raise SystemExit(f"error: {error}") from None


def held_out_error(metrics: dict) -> str:
    """' ± 0.0123 (standard error, n = 8 images, each with its own seed)' from an evaluation's
    eval/reward_std (over the images) and eval/n; '' when either is missing."""
    n, std = metrics.get("eval/n"), metrics.get("eval/reward_std")
    if not n or std is None:
        return ""
    error = f"{std / math.sqrt(n - 1):.4f}" if n > 1 else "n/a"
    return f" ± {error} (standard error, n = {n} images, each with its own seed)"


class ProgressPrinter:
    """A tqdm bar over the whole run plus one line of metrics per epoch."""

    def __init__(self, epochs: int, enabled: bool = True):
        from tqdm.auto import tqdm
        self.enabled = enabled      # off on the ranks > 0 of a distributed run
        self.bar = tqdm(total=1000, desc="PRDP", unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
                        file=sys.stderr, disable=not enabled)

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        if event["type"] == "step":
            self.bar.n = int(event["progress"] * 1000)
            self.bar.set_description(f"PRDP epoch {event['epoch']} {event['phase']}")
            self.bar.refresh()
        elif event["type"] == "phase":        # e.g. the held-out evaluation's progress (heldout.py)
            self.bar.set_description(f"PRDP epoch {event['epoch']} {event['phase']}")
            self.bar.refresh()
        elif event["type"] == "epoch":
            m = event["metrics"]
            self.bar.write(f"epoch {m['epoch']:4d}  reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}  "
                           f"loss {m['loss']:.4g}  clip {m['clip_frac']:.3f}  kl {m['kl']:.4g}  "
                           f"on-policy diff {m['onpolicy_max_diff']:.1e}")
        elif event["type"] == "estimate":
            self.bar.write(f"estimated cost: ~{format_duration(event['epoch_seconds'])} per epoch "
                           f"({event['evaluations_per_epoch']} model evaluations of one image, "
                           f"{event['seconds_per_evaluation']:.2g} s each, measured once; batching makes it faster)")
        elif event["type"] == "checkpoint":
            self.bar.write(f"checkpoint: {event['path']}")
        elif event["type"] == "eval":
            m = event["metrics"]
            self.bar.write(f"held-out after epoch {event['epoch']}: reward {m['eval/reward_mean']:+.4f}"
                           + held_out_error(m) + " "
                           f"(best {m['eval/best_reward_mean']:+.4f} at epoch {m['eval/best_epoch']}"
                           + (f", {m['eval/divergence_strikes']} diverging" if m['eval/divergence_strikes'] else "")
                           + ")")
        elif event["type"] == "done" and event.get("early_stopped"):
            self.bar.close()
            print(f"early stop after epoch {event['epochs']}: the held-out reward fell while the training "
                  "reward rose (best LoRA in best/)", file=sys.stderr)
        elif event["type"] == "done":
            self.bar.n = 1000 if not event["stopped"] else self.bar.n
            self.bar.close()


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


class LoadRefused(Exception):
    """A refusal (one 'error: ...' line) while loading, kept by a distributed rank (RankFaults)."""


def _refusal_kept(work):
    """`work` with its SystemExit refusals raised as LoadRefused, an exception RankFaults keeps
    (a single process keeps its plain SystemExit: one 'error: ...' line)."""
    def run(*args, **kwargs):
        try:
            return work(*args, **kwargs)
        except SystemExit as refusal:
            if not isinstance(refusal.code, str):
                raise
            raise LoadRefused(refusal.code[len("error: "):] if refusal.code.startswith("error: ") else refusal.code) \
                from None
    return run


def _load_reward_and_model(args, config: TrainConfig):
    """(reward, backend) of this run; a refused one ends the command with one 'error: ...' line."""
    import torch

    from ..models.loading import load_backend
    from ..policies import policy_for
    from ..progress import timed_phase

    with timed_phase(f"loading the reward {args.reward!r}"):
        reward = make_reward(args)
    torch.manual_seed(config.seed)    # the LoRA's initial weights derive from the seed (every rank alike)
    try:
        with timed_phase(f"loading the model {args.base or 'embedded-tiny-sd'}"):
            backend = load_backend(args.base, config, device=args.device, base_config=args.base_config)
        policy_for(config, backend)       # --policy against the model (ddpm on a flow model: one line)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}")
    return reward, backend


def run_training(args, config: TrainConfig, prompts: List[str], checkpoint, dist=None) -> int:
    """Load, evaluate, train (from `checkpoint`, a CheckpointData or path, when given) and
    report, in a claimed --out. `dist`: this rank of a distributed run (rank 0 reports)."""
    from ..distributed.group import SINGLE
    from ..runs.plots import comparison_grid, reward_curve
    from ..distributed.faults import RankFailed, RankFaults
    from ..rewards.remote import RewardServerError
    from ..trainer import Trainer

    dist = dist or SINGLE
    evaluate = not args.no_eval and dist.is_main
    faults = RankFaults(dist)     # distributed: rank 0's evaluation error ends every rank (distributed/faults.py)
    prompts, held_out = split_held_out(args, config, prompts)   # before any model loads
    if held_out is not None and args.eval_prompts_file:
        from ..heldout import shared_prompts
        shared = shared_prompts(prompts, held_out)
        if shared:
            print(f"note: {shared} training prompt(s) are also in {args.eval_prompts_file}: the held-out reward is "
                  "not only on unseen prompts", file=sys.stderr)
    try:
        # distributed: a rank that cannot load (a file missing on its node, out of memory on its
        # GPU, its reward server refusing) ends every rank here, instead of leaving them waiting
        faults.phase = "loading the model and the reward"
        load = _refusal_kept(_load_reward_and_model) if dist.enabled else _load_reward_and_model
        reward, backend = faults.attempt(load, args, config) or (None, None)
        if dist.enabled:
            faults.check(dist.any(faults.failed))
        if evaluate:
            row_prompts, row_seeds = held_out_set(args.base)
            faults.phase = "the held-out evaluation before training"
            before, before_images = faults.attempt(evaluate_held_out, "before training", backend, reward,
                                                   row_prompts, row_seeds, config, lora=False) or (None, None)
        if dist.enabled:      # rank 0's evaluation outcome reaches every rank before the Trainer's first collective
            faults.check(dist.any(faults.failed))
    except KeyboardInterrupt:
        print(f"interrupted before training started: nothing to keep; run the same command again to start "
              f"over in {args.out}", file=sys.stderr)
        return 130
    except RankFailed as failure:
        if failure.__cause__ is not None and not isinstance(failure.__cause__, (RewardServerError, LoadRefused)):
            traceback.print_exception(failure.__cause__, file=sys.stderr)
        print(f"error: {failure}", file=sys.stderr)
        return 2
    printer = ProgressPrinter(config.epochs, enabled=dist.is_main)
    trainer = Trainer(backend, reward, prompts, config, out_dir=args.out, callback=printer, distributed=dist)
    if held_out is not None:
        from ..heldout import HeldOutMonitor
        trainer.held_out = HeldOutMonitor(held_out, config)
    resume_from = getattr(checkpoint, "path", checkpoint)
    start = time.perf_counter()
    try:
        with stop_requests(trainer.stop_event, interrupt=dist.enabled, stop_file=args.stop_file):
            result = trainer.run(resume_from=resume_from)
    except RankFailed as failure:        # distributed: an error on some rank ended every rank (distributed/faults.py)
        printer.bar.close()
        cause = failure.__cause__          # on the rank that failed: its own error
        if cause is not None and not isinstance(cause, (RewardServerError, PromptTextError)):
            traceback.print_exception(cause, file=sys.stderr)
        print(f"error: {failure}", file=sys.stderr)
        return 2
    except (RewardServerError, PromptTextError) as error:   # mid-run: the reward server went away, the prompt file changed
        printer.bar.close()
        path = trainer.save_checkpoint(partial=True)
        print(f"error: {error}\ncheckpoint: {path} (fix that, then continue with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        printer.bar.close()
        print("interrupted: saving a checkpoint", file=sys.stderr)
        trainer.stop_event.set()
        path = trainer.save_checkpoint(partial=True)
        print(f"checkpoint: {path} (continue with --resume)", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    if not dist.is_main:
        return 130 if result.stopped else 0
    if result.stopped:
        print(f"stopped after {result.epochs_done} finished epochs; checkpoint: {result.checkpoint_path} "
              "(continue with --resume)", file=sys.stderr)
        return 130
    reward_curve(trainer.metrics, title=f"{reward.name}: reward per epoch (mean ± std)").save(args.out / "reward_curve.png")
    print(f"trained {result.epochs_done} epochs in {elapsed:.0f} s; LoRA: {result.lora_path}")
    if evaluate:
        after, after_images = evaluate_held_out("after training", backend, reward, row_prompts, row_seeds, config)
        from ..world.demo_eval import (GUARD_REWARD, alignment_guard, captioned_grid, guard_line, held_out_record,
                                      summary_lines, write_json)
        if is_world_base(args.base):
            per_prompt = len(row_seeds) // len(set(row_prompts))
            grid = captioned_grid(list(dict.fromkeys(row_prompts)), per_prompt, before_images, after_images,
                                  before, after)
            (args.out / "train_prompts.txt").write_text("\n".join(prompts) + "\n")
        else:
            shown = grid_rows_shown(row_prompts)
            grid = comparison_grid([before_images[shown], after_images[shown]], ["before", "after"],
                                   [before[shown], after[shown]])
        grid.save(args.out / "before_after.png")
        record = held_out_record(row_prompts, row_seeds, before, after)
        record.update(held_out_reward_before=before.mean().item(), held_out_reward_after=after.mean().item())
        if is_world_base(args.base) and reward.name != GUARD_REWARD:
            record["alignment_guard"] = alignment_guard(row_prompts, row_seeds, before_images, after_images)
        write_json(args.out / "held_out.json", record)
    print(f"wrote {args.out}/metrics.jsonl, reward_curve.png" + (", before_after.png, held_out.json" if evaluate else ""))
    if evaluate:    # the last lines: the paired change on the held-out (for the world: unseen) prompts
        label = "unseen prompts" if is_world_base(args.base) else "held-out prompts"
        if "alignment_guard" in record:
            print(guard_line(record["alignment_guard"]))
        print("\n".join(summary_lines(record["summary"], label)))
    return 0


def is_world_base(base: Optional[str]) -> bool:
    from ..world.model import MODEL_NAME
    return base is not None and str(base).strip() == MODEL_NAME


def held_out_set(base: Optional[str]):
    """(row prompts, row seeds) of the before/after evaluation, every image with its own seed
    (evaluation.py): for the world model, unseen captions."""
    if is_world_base(base):
        from ..world.demo_eval import eval_rows
        return eval_rows()
    from ..evaluation import distinct_seed_rows
    return distinct_seed_rows(HELD_OUT_PROMPTS, HELD_OUT_IMAGES_PER_PROMPT, HELD_OUT_FIRST_SEED)


def grid_rows_shown(row_prompts: Sequence[str]) -> List[int]:
    """The rows before_after.png shows: the first GRID_IMAGES_PER_PROMPT images of each prompt."""
    seen: dict = {}
    shown = []
    for row, prompt in enumerate(row_prompts):
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] <= GRID_IMAGES_PER_PROMPT:
            shown.append(row)
    return shown


def evaluate_held_out(when: str, backend, reward, row_prompts, row_seeds, config: TrainConfig, lora: bool = True):
    """(rewards, images) of the before/after evaluation, with progress lines on stderr."""
    from ..evaluation import score_rows
    from ..progress import PhaseProgress

    batches = math.ceil(len(row_seeds) / config.sample_batch_size)
    progress = PhaseProgress(f"held-out evaluation {when} ({len(row_seeds)} images)", batches * config.steps,
                             unit="denoising steps")

    def on_step(done: int, total: int) -> None:
        progress.total = total
        progress.update(done)
    result = score_rows(backend, reward, row_prompts, row_seeds, config, lora=lora, progress=on_step)
    progress.finish()
    return result


def split_held_out(args, config: TrainConfig, prompts: Sequence[str]):
    """(training prompts, heldout.HeldOutSet or None) for --eval-every (see heldout.py)."""
    from ..heldout import held_out_split

    eval_file = read_prompts(args.eval_prompts_file, args.prompt_field) if args.eval_prompts_file else None
    if eval_file is not None and not config.eval_every:
        raise SystemExit("error: --eval-prompts-file needs --eval-every N (epochs between held-out evaluations)")
    try:
        return held_out_split(prompts, config, eval_file)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


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


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; a refused input prints one 'error: ...' line and returns 2."""
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "serve-reward"):
        return 2
    try:
        if args.command == "serve-reward":
            from ..rewards.server import serve
            return serve(args)
        return train(args)
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr)
        return 2
